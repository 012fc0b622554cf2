"""End to end on digits with a tiny config: train, checkpoint, resume, sample, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffusion_jax.checkpointing import NoCheckpointError
from diffusion_jax.errors import ConfigError
from diffusion_jax.runner import sample as sample_mode
from diffusion_jax.runner import train as train_mode
from diffusion_jax.runner.workdir import read_metrics
from tests.conftest import COMPILATION_CACHE_ENV, TINY_OVERRIDES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_train_writes_checkpoints_metrics_config_and_sample_grid(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    state = train_mode.train(tiny_config, workdir)

    assert int(state.step) == 6
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["steps_per_sec"] > 0 for r in records)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["training"]["num_train_steps"] == 6
    assert os.path.exists(os.path.join(workdir, "samples", "train_step6.png"))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))


def test_rerun_resumes_from_latest_checkpoint_and_matches_uninterrupted_run(tiny_config, tmp_path):
    straight = train_mode.train(tiny_config, str(tmp_path / "straight"))

    resumed_dir = str(tmp_path / "resumed")
    tiny_config.training.num_train_steps = 3
    train_mode.train(tiny_config, resumed_dir)
    tiny_config.training.num_train_steps = 6
    resumed = train_mode.train(tiny_config, resumed_dir)

    assert int(resumed.step) == 6
    for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sample_writes_uint8_npz_that_ignores_sampling_batch_size(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    train_mode.train(tiny_config, workdir)

    tiny_config.sampling.name = "batch4"
    path4 = sample_mode.sample(tiny_config, workdir)
    tiny_config.sampling.batch_size = 2
    tiny_config.sampling.name = "batch2"
    path2 = sample_mode.sample(tiny_config, workdir)

    images4, images2 = np.load(path4)["images"], np.load(path2)["images"]
    assert images4.dtype == np.uint8 and images4.shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(images4, images2)
    assert os.path.exists(path4[: -len(".npz")] + ".png")


def test_sample_on_empty_workdir_raises_no_checkpoint_error(tiny_config, tmp_path):
    with pytest.raises(NoCheckpointError, match="train first"):
        sample_mode.sample(tiny_config, str(tmp_path / "empty"))


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "experiments.main", *args],
        cwd=REPO,
        env={**os.environ, **COMPILATION_CACHE_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_applies_overrides_and_writes_resolved_config(digits_data_dir, tmp_path):
    # The tiny config's values, so the subprocess reuses the programs the other tests compiled.
    workdir = tmp_path / "cli"
    result = _run_cli(
        "--config=configs/digits.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={digits_data_dir}",
        *TINY_OVERRIDES,
        "--config.training.num_train_steps=2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["ch"] == 32 and config["training"]["num_train_steps"] == 2
    assert config["data"]["data_dir"] == digits_data_dir
    assert os.listdir(workdir / "checkpoints") == ["2"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--mode=sample"], "no checkpoint in"),
        (["--config.data.name=mnist"], "tfds build mnist"),
        (["--config.sampling.sampler=euler"], "sampler"),
        (["--config.training.batch_sise=8"], "unknown config key 'training.batch_sise'"),
    ],
)
def test_cli_bad_input_exits_with_one_line_error(overrides, message, tmp_path):
    result = _run_cli(
        "--config=configs/digits.py",
        f"--workdir={tmp_path / 'w'}",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        *overrides,
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_sample_refuses_a_config_whose_diffusion_differs_from_the_trained_run(
    tiny_config, tmp_path
):
    workdir = str(tmp_path / "run")
    train_mode.train(tiny_config, workdir)
    tiny_config.diffusion.prediction = "v"
    with pytest.raises(ConfigError, match=r"diffusion\.prediction"):
        sample_mode.sample(tiny_config, workdir)
