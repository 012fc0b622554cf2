"""End to end on digits with a tiny config: train, checkpoint, resume, sample (the command line:
test_cli.py)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from diffusion_jax.checkpointing import NoCheckpointError
from diffusion_jax.errors import ConfigError
from diffusion_jax.runner import sample as sample_mode
from diffusion_jax.runner import train as train_mode
from diffusion_jax.runner.workdir import read_metrics


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_train_writes_checkpoints_metrics_config_and_sample_grid(shared_tiny_run):
    workdir, _, state = shared_tiny_run  # train_mode.train(tiny config) of 6 steps

    assert int(state.step) == 6
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["steps_per_sec"] > 0 for r in records)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["training"]["num_train_steps"] == 6
    assert os.path.exists(os.path.join(workdir, "samples", "train_step6.png"))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))


@pytest.mark.slow
def test_rerun_resumes_from_latest_checkpoint_and_matches_uninterrupted_run(
    tiny_config, shared_tiny_run, tmp_path
):
    straight = shared_tiny_run.state  # the same config trained for 6 steps without a stop
    resumed_dir = str(tmp_path / "resumed")
    tiny_config.training.num_train_steps = 3
    train_mode.train(tiny_config, resumed_dir)
    tiny_config.training.num_train_steps = 6
    resumed = train_mode.train(tiny_config, resumed_dir)

    assert int(resumed.step) == 6
    for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sample_writes_uint8_npz_that_ignores_sampling_batch_size(trained_tiny_run):
    workdir, tiny_config = trained_tiny_run
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


def test_sample_refuses_a_config_whose_diffusion_differs_from_the_trained_run(shared_tiny_run):
    config = shared_tiny_run.fresh_config()
    config.diffusion.prediction = "v"
    with pytest.raises(ConfigError, match=r"diffusion\.prediction"):
        sample_mode.sample(config, shared_tiny_run.workdir)  # refused before writing anything
