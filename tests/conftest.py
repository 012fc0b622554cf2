"""Shared fixtures: a digits dataset built once per session and a tiny, fast config."""

from __future__ import annotations

import os

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


@pytest.fixture(scope="session")
def _trained_tiny_run(
    digits_data_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, ml_collections.ConfigDict]:
    from diffusion_jax.runner import train as train_mode

    config = make_tiny_config(digits_data_dir)
    workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
    train_mode.train(config, workdir)
    return workdir, config


@pytest.fixture
def trained_tiny_run(
    _trained_tiny_run: tuple[str, ml_collections.ConfigDict], tmp_path
) -> tuple[str, ml_collections.ConfigDict]:
    """(workdir, config) of a tiny run trained once per session; each test gets its own copy."""
    import copy
    import shutil

    source, config = _trained_tiny_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    return workdir, copy.deepcopy(config)
