"""Shared fixtures: a digits dataset built once per session, a tiny, fast config, and tiny runs
trained once per session (plain and learn_sigma) that tests read or copy."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import pytest

from configs import digits

# Tests build the same tiny programs many times (every train run compiles its step and sampler);
# XLA's persistent cache turns each repeat into a load.
COMPILATION_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"
    ),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE_ENV["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# `make_tiny_config` as command-line overrides of configs/digits.py, for subprocess tests.
TINY_OVERRIDES = [
    "--config.model.ch=32",
    "--config.model.ch_mult=(1, 2)",
    "--config.model.num_res_blocks=1",
    "--config.model.attn_resolutions=(4,)",
    "--config.diffusion.num_timesteps=100",
    "--config.training.num_train_steps=6",
    "--config.training.batch_size=16",
    "--config.training.warmup_steps=2",
    "--config.training.log_every=2",
    "--config.training.checkpoint_every=3",
    "--config.training.num_grid_samples=4",
    "--config.sampling.num_samples=6",
    "--config.sampling.batch_size=4",
    "--config.sampling.num_steps=4",
]


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TFDS data_dir holding the digits dataset, built once for the whole session."""
    from diffusion_jax.data import pipeline

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    pipeline.ensure_prepared("digits", data_dir)
    return data_dir


def make_tiny_config(data_dir: str) -> ml_collections.ConfigDict:
    """The digits config shrunk so a run of a few steps takes seconds on 2 CPU cores."""
    config = digits.get_config()
    config.data.data_dir = data_dir
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.diffusion.num_timesteps = 100
    config.training.num_train_steps = 6
    config.training.batch_size = 16
    config.training.warmup_steps = 2
    config.training.log_every = 2
    config.training.checkpoint_every = 3
    config.training.num_grid_samples = 4
    config.sampling.num_samples = 6
    config.sampling.batch_size = 4
    config.sampling.num_steps = 4
    return config


@pytest.fixture
def tiny_config(digits_data_dir: str) -> ml_collections.ConfigDict:
    return make_tiny_config(digits_data_dir)


class TrainedRun(NamedTuple):
    """A tiny run trained once per session by `train_mode.train`: its workdir (checkpoints 3 and
    6, metrics logged at steps 2, 4 and 6), the config it was trained with and the final state
    `train` returned. Shared by every test that uses it: read it, never write to it (the
    session fails at the end if anything did); `fresh_config()` is a copy to change."""

    workdir: str
    config: ml_collections.ConfigDict
    state: Any

    def fresh_config(self) -> ml_collections.ConfigDict:
        return copy.deepcopy(self.config)


def _files(root: str) -> dict[str, tuple[int, int]]:
    """{path: (size, mtime)} of every file and directory under `root`."""
    found = {}
    for directory, subdirs, names in os.walk(root):
        for name in subdirs + names:
            path = os.path.join(directory, name)
            stat = os.lstat(path)
            found[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
    return found


def _train_shared_run(
    tmp_path_factory: pytest.TempPathFactory, name: str, config: ml_collections.ConfigDict
) -> Iterator[TrainedRun]:
    from diffusion_jax.runner import train as train_mode

    workdir = str(tmp_path_factory.mktemp(name) / "run")
    state = train_mode.train(config, workdir)
    before = _files(workdir)
    yield TrainedRun(workdir, config, state)
    changed = sorted(set(before.items()) ^ set(_files(workdir).items()))
    assert not changed, (
        f"a test wrote to the session's shared {name} (write to a copy: trained_* fixtures): "
        f"{sorted({path for path, _ in changed})}"
    )


@pytest.fixture(scope="session")
def shared_tiny_run(
    digits_data_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrainedRun]:
    """The tiny config trained for 6 steps, once per session; read only (see TrainedRun)."""
    yield from _train_shared_run(tmp_path_factory, "tiny_run", make_tiny_config(digits_data_dir))


@pytest.fixture(scope="session")
def shared_learn_sigma_run(
    digits_data_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrainedRun]:
    """The tiny config with model.learn_sigma=True trained for 6 steps, once per session; read
    only (see TrainedRun)."""
    config = make_tiny_config(digits_data_dir)
    config.model.learn_sigma = True
    yield from _train_shared_run(tmp_path_factory, "learn_sigma_run", config)


def make_formulation_config(data_dir: str, formulation: str) -> ml_collections.ConfigDict:
    """The tiny config in `formulation` ('ddpm', 'edm' or 'flow'), as configs/digits_<f>.py set
    it (those configs differ from digits.py in their formulation, sampler and bits/dim)."""
    config = make_tiny_config(data_dir)
    config.diffusion.formulation = formulation
    if formulation != "ddpm":
        config.eval.bpd_num_images = 0
    return config


@pytest.fixture(scope="session")
def shared_flow_run(
    digits_data_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrainedRun]:
    """The tiny config as flow matching, trained for 6 steps once per session; read only."""
    config = make_formulation_config(digits_data_dir, "flow")
    yield from _train_shared_run(tmp_path_factory, "flow_run", config)


@pytest.fixture(scope="session")
def shared_edm_run(
    digits_data_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrainedRun]:
    """The tiny config in the edm formulation, trained for 6 steps once per session; read only."""
    config = make_formulation_config(digits_data_dir, "edm")
    yield from _train_shared_run(tmp_path_factory, "edm_run", config)


def _copy_run(run: TrainedRun, tmp_path: Path) -> tuple[str, ml_collections.ConfigDict]:
    workdir = str(tmp_path / "run")
    shutil.copytree(run.workdir, workdir, symlinks=True)
    return workdir, run.fresh_config()


@pytest.fixture
def trained_tiny_run(
    shared_tiny_run: TrainedRun, tmp_path: Path
) -> tuple[str, ml_collections.ConfigDict]:
    """(workdir, config) of this test's own copy of `shared_tiny_run`, free to write to."""
    return _copy_run(shared_tiny_run, tmp_path)


@pytest.fixture
def trained_learn_sigma_run(
    shared_learn_sigma_run: TrainedRun, tmp_path: Path
) -> tuple[str, ml_collections.ConfigDict]:
    """(workdir, config) of this test's own copy of `shared_learn_sigma_run`."""
    return _copy_run(shared_learn_sigma_run, tmp_path)
