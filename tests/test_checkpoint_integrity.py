"""Checkpoint integrity: bytes damaged on disk, the run's config inside each checkpoint,
non-finite samples never written as images, eval shards checked against their digests, and a
full disk reported as one line naming the step."""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections import namedtuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffusion_jax import checkpointing, train_state
from diffusion_jax.errors import (
    CheckpointSaveError,
    ConfigError,
    CorruptCheckpointError,
    NonFiniteError,
)
from diffusion_jax.runner import evaluate, loading, setup
from diffusion_jax.runner import sample as sample_mode
from diffusion_jax.runner import train as train_mode
from diffusion_jax.runner import workdir as workdir_lib
from tests.conftest import COMPILATION_CACHE_ENV, TINY_OVERRIDES

# Orbax leaves the coroutines of a failed restore or save unfinished; they complain when
# garbage-collected, which may happen during any later test of this module.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raw_state_leaves(workdir: str, step: int) -> list[np.ndarray]:
    """The state leaves saved at `step` as orbax alone reads them (no digest check)."""
    manager = ocp.CheckpointManager(
        checkpointing.checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(read_only=True)
    )
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    return [np.asarray(x) for x in jax.tree.leaves(restored["state"])]


def _flip_bytes_orbax_cannot_see(workdir: str, step: int) -> None:
    """XOR 64 bytes inside the array data of checkpoint `step` at a place orbax still reads
    back without an error, with changed values: the damage only a digest can catch."""
    before = _raw_state_leaves(workdir, step)
    directory = os.path.join(checkpointing.checkpoint_dir(workdir), str(step), "state")
    files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
    largest = max(files, key=os.path.getsize)
    size = os.path.getsize(largest)
    for fraction in (0.5, 0.3, 0.7, 0.4, 0.6, 0.2, 0.8):
        offset = int(size * fraction)
        with open(largest, "r+b") as f:
            f.seek(offset)
            original = f.read(64)
            f.seek(offset)
            f.write(bytes(b ^ 0xFF for b in original))
        try:
            after = _raw_state_leaves(workdir, step)
        except Exception:
            after = None
        if after is not None and any(
            not np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after, strict=True)
        ):
            return
        with open(largest, "r+b") as f:
            f.seek(offset)
            f.write(original)
    pytest.fail("found no place where flipped bytes restore silently")


def _meta_file(workdir: str, step: int) -> str:
    return os.path.join(
        checkpointing.checkpoint_dir(workdir), str(step), checkpointing.META_ITEM, "metadata"
    )


# ---------------------------------------------------------------------------------------------
# Digests


def test_each_checkpoint_records_a_sha256_per_array_and_the_run_config(shared_tiny_run):
    workdir, config = shared_tiny_run.workdir, shared_tiny_run.config
    record = checkpointing.read_metadata(workdir, 6)
    assert record is not None
    assert record["config"] == workdir_lib.config_json(config)
    leaves = jax.tree_util.tree_flatten_with_path(shared_tiny_run.state)[0]
    digests = record["state_sha256"]
    assert len(digests) == len(leaves)
    # Anyone can check a digest: the sha256 of the array's bytes in C order.
    kernel = np.asarray(shared_tiny_run.state.ema_params["conv_in"]["kernel"])
    expected = hashlib.sha256(np.ascontiguousarray(kernel).tobytes()).hexdigest()
    assert digests["ema_params/conv_in/kernel"] == expected


@pytest.mark.slow
def test_flipped_bytes_in_the_latest_checkpoint_are_set_aside_and_training_resumes_before(
    tiny_config, shared_tiny_run, trained_tiny_run, caplog
):
    workdir, _ = trained_tiny_run
    _flip_bytes_orbax_cannot_see(workdir, 6)
    with caplog.at_level(logging.WARNING):
        state = train_mode.train(tiny_config, workdir)

    warnings = [r.getMessage() for r in caplog.records if "Checkpoint 6" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "damaged on disk" in warnings[0] and "using checkpoint 3 instead" in warnings[0]
    assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "6"))
    # Resumed from 3 and trained 4..6 again: exactly the undamaged run's state.
    assert int(state.step) == 6
    for a, b in zip(
        _raw_state_leaves(shared_tiny_run.workdir, 6), _raw_state_leaves(workdir, 6), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sample_mode_reads_the_previous_checkpoint_when_the_latest_has_flipped_bytes(
    trained_tiny_run, caplog
):
    workdir, config = trained_tiny_run
    _flip_bytes_orbax_cannot_see(workdir, 6)
    with caplog.at_level(logging.WARNING):
        path = sample_mode.sample(config, workdir)
    assert any(
        "damaged on disk" in r.getMessage() and "left it in place" in r.getMessage()
        for r in caplog.records
    )
    with open(path[: -len(".npz")] + ".json") as f:
        assert json.load(f)["step"] == 3


@pytest.mark.slow
def test_a_damaged_checkpoint_asked_for_by_step_is_refused_in_one_line(trained_tiny_run):
    workdir, _ = trained_tiny_run
    _flip_bytes_orbax_cannot_see(workdir, 6)
    with pytest.raises(CorruptCheckpointError) as raised:
        loading.load_run(workdir, step=6)
    assert "checkpoint 6" in str(raised.value) and "\n" not in str(raised.value)
    assert loading.load_run(workdir, step=3).step == 3


def test_a_garbled_meta_record_counts_as_a_corrupt_checkpoint(trained_tiny_run, caplog):
    workdir, _ = trained_tiny_run
    with open(_meta_file(workdir, 6), "w") as f:
        f.write('{"format": 1, "state_sha2')
    with caplog.at_level(logging.WARNING):
        run = loading.load_run(workdir)
    assert run.step == 3
    assert any("unreadable meta record" in r.getMessage() for r in caplog.records)


def test_checkpoints_written_before_meta_records_load_without_a_check(trained_tiny_run):
    workdir, config = trained_tiny_run
    for step in (3, 6):
        shutil.rmtree(os.path.dirname(_meta_file(workdir, step)))
    assert checkpointing.read_metadata(workdir, 6) is None
    assert loading.load_run(workdir).step == 6
    # The locked-key check falls back to config.json.
    config.diffusion.prediction = "v"
    with pytest.raises(ConfigError, match=r"diffusion\.prediction"):
        sample_mode.sample(config, workdir)


# ---------------------------------------------------------------------------------------------
# The run's config inside each checkpoint


def test_resume_without_config_json_refuses_a_locked_change_from_the_checkpoint_config(
    trained_tiny_run, monkeypatch
):
    workdir, config = trained_tiny_run
    os.remove(os.path.join(workdir, "config.json"))
    config.diffusion.prediction = "v"

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(train_state, "create_model", must_not_build)
    with pytest.raises(ConfigError) as raised:
        train_mode.train(config, workdir)
    message = str(raised.value)
    assert "diffusion.prediction: 'eps' -> 'v'" in message and "\n" not in message
    assert "--allow_config_change" in message


def test_sample_and_load_run_without_config_json_use_the_checkpoint_config(trained_tiny_run):
    workdir, config = trained_tiny_run
    os.remove(os.path.join(workdir, "config.json"))
    run = loading.load_run(workdir)  # no config given: the checkpoint's
    assert run.config.diffusion.prediction == "eps" and run.config.model.ch_mult == (1, 2)
    config.model.ch = 64
    with pytest.raises(ConfigError, match=r"model\.ch: 32 -> 64"):
        sample_mode.sample(config, workdir)


def test_the_checkpoint_config_wins_over_an_edited_config_json(trained_tiny_run):
    workdir, config = trained_tiny_run
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        edited = json.load(f)
    edited["diffusion"]["prediction"] = "v"
    with open(path, "w") as f:
        json.dump(edited, f)
    config.diffusion.prediction = "v"  # agrees with config.json, not with the checkpoints
    with pytest.raises(ConfigError, match=r"diffusion\.prediction: 'eps' -> 'v'"):
        sample_mode.sample(config, workdir)


# ---------------------------------------------------------------------------------------------
# Non-finite samples


def _with_nan_ema(monkeypatch) -> None:
    restore = setup.ModelSetup.restore

    def nan_restore(self, workdir, step=None):
        state = restore(self, workdir, step)
        return state.replace(ema_params=jax.tree.map(lambda x: x * jnp.nan, state.ema_params))

    monkeypatch.setattr(setup.ModelSetup, "restore", nan_restore)


@pytest.mark.slow
def test_sample_mode_refuses_to_write_images_from_nan_outputs(trained_tiny_run, monkeypatch):
    workdir, config = trained_tiny_run
    _with_nan_ema(monkeypatch)
    with pytest.raises(NonFiniteError) as raised:
        sample_mode.sample(config, workdir)
    message = str(raised.value)
    assert "came out NaN or Inf" in message and "ids 0, 1, 2, 3" in message
    assert "\n" not in message
    assert not os.path.exists(os.path.join(workdir, "samples", "dpm_solverpp4_seed0.npz"))


@pytest.mark.slow
def test_eval_refuses_to_write_shards_from_nan_outputs(trained_tiny_run, tmp_path, monkeypatch):
    workdir, config = trained_tiny_run
    config.eval.num_samples, config.eval.batch_size, config.eval.shard_size = 10, 5, 10
    config.eval.metrics, config.eval.bpd_num_images = ("is",), 0
    _with_nan_ema(monkeypatch)
    with pytest.raises(NonFiniteError, match="came out NaN or Inf"):
        evaluate.evaluate(config, workdir)
    shard_dir = os.path.join(workdir, "eval", evaluate.eval_name(config))
    assert os.listdir(shard_dir) == ["manifest.json"]


def test_a_training_grid_of_nan_samples_is_skipped_with_a_warning(
    shared_tiny_run, tmp_path, caplog
):
    config = shared_tiny_run.fresh_config()
    model_setup = setup.ModelSetup(config)

    def nan_grid(params, rng, ids, labels):
        return jnp.full((len(ids), 8, 8, 1), jnp.nan)

    with caplog.at_level(logging.WARNING):
        train_mode._write_training_grid(
            model_setup, config, nan_grid, shared_tiny_run.state, str(tmp_path), 6
        )
    assert any("step 6: no sample grid written" in r.getMessage() for r in caplog.records)
    assert not os.path.exists(tmp_path / "samples" / "train_step6.png")


# ---------------------------------------------------------------------------------------------
# Eval shards


@pytest.mark.slow
def test_eval_generates_again_a_shard_damaged_on_disk(trained_tiny_run, caplog):
    workdir, config = trained_tiny_run
    config.eval.num_samples, config.eval.batch_size, config.eval.shard_size = 10, 4, 5
    config.eval.metrics, config.eval.bpd_num_images = ("is",), 0
    first = evaluate.evaluate(config, workdir)
    shard_dir = os.path.join(workdir, "eval", first.name)
    with open(os.path.join(shard_dir, "manifest.json")) as f:
        digests = json.load(f)["shards"]
    path = os.path.join(shard_dir, "shard_00001.npz")
    assert set(digests) == {"shard_00000.npz", "shard_00001.npz"}
    assert digests["shard_00001.npz"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    good = np.load(path)["images"]
    kept = os.stat(os.path.join(shard_dir, "shard_00000.npz")).st_mtime_ns
    with open(path, "r+b") as f:  # flip bytes of the image payload
        f.seek(os.path.getsize(path) - 100)
        f.write(b"\xff" * 8)

    with caplog.at_level(logging.WARNING):
        second = evaluate.evaluate(config, workdir)
    assert any("shard_00001.npz differs from the sha256" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(np.load(path)["images"], good)
    assert os.stat(os.path.join(shard_dir, "shard_00000.npz")).st_mtime_ns == kept
    assert second.metrics == first.metrics


# ---------------------------------------------------------------------------------------------
# Disk full


@pytest.mark.slow
def test_a_save_that_does_not_fit_on_the_disk_is_refused_naming_its_step(
    tiny_config, trained_tiny_run, monkeypatch
):
    workdir, _ = trained_tiny_run
    usage = shutil.disk_usage(workdir)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: Usage(usage.total, usage.total - 4096, 4096)
    )
    tiny_config.training.num_train_steps = 9
    with pytest.raises(CheckpointSaveError) as raised:
        train_mode.train(tiny_config, workdir)
    message = str(raised.value)
    assert "saving checkpoint 9" in message and "not enough free disk space" in message
    assert "checkpoint 6 is intact" in message and "\n" not in message
    assert checkpointing.finished_steps(workdir) == [3, 6]
    assert sorted(os.listdir(checkpointing.checkpoint_dir(workdir))) == ["3", "6"]


@pytest.mark.slow
def test_a_write_failing_in_the_background_is_reported_for_its_own_step(
    tiny_config, trained_tiny_run, monkeypatch
):
    """The kernel refuses the write inside orbax's background thread (a file-size limit: the
    same failure path as a full disk). It surfaces when the next save starts, at step 12; the
    error must name step 9."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN  # Python's default: EFBIG
    workdir, _ = trained_tiny_run
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    save = checkpointing.Checkpointer.save

    def save_with_a_file_size_limit_from_step_9(self, step, *args, **kwargs):
        if step == 9:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpointing.Checkpointer, "save", save_with_a_file_size_limit_from_step_9)
    tiny_config.training.num_train_steps = 12
    try:
        with pytest.raises(CheckpointSaveError) as raised:
            train_mode.train(tiny_config, workdir)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    gc.collect()  # orbax's abandoned writes report themselves when collected: here, captured
    message = str(raised.value)
    assert "saving checkpoint 9 " in message and "File too large [errno 27]" in message
    assert "checkpoint 6 is intact" in message and "\n" not in message
    assert checkpointing.finished_steps(workdir) == [3, 6]


@pytest.mark.slow  # a training process
def test_cli_reports_a_failed_background_save_as_one_line(digits_data_dir, tmp_path):
    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

    workdir = str(tmp_path / "run")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.main",
            "--config=configs/digits.py",
            f"--workdir={workdir}",
            f"--config.data.data_dir={digits_data_dir}",
            *TINY_OVERRIDES,
        ],
        cwd=REPO,
        env={**os.environ, **COMPILATION_CACHE_ENV},
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=300,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if not line.startswith("I")]
    assert lines == [
        f"error: saving checkpoint 3 to {workdir}/checkpoints failed (File too large "
        f"[errno {errno.EFBIG}]); no earlier checkpoint exists; free disk space or fix "
        "permissions and rerun to resume"
    ], result.stderr[-3000:]
