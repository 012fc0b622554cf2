"""Pre-emption and faults: SIGKILL/SIGTERM and resume, non-finite steps, config changes on
resume, unwritable workdirs, corrupt checkpoints and failed saves."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffusion_jax import checkpointing, train_state
from diffusion_jax.errors import ConfigError, NonFiniteError
from diffusion_jax.runner import sample as sample_mode
from diffusion_jax.runner import train as train_mode
from diffusion_jax.runner.workdir import read_metrics
from tests.conftest import COMPILATION_CACHE_ENV, TINY_OVERRIDES

# Orbax leaves the coroutines of a failed restore (the corrupt-checkpoint tests) unfinished; they
# complain when garbage-collected, which may happen during any later test of this module.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Metrics that depend only on the computation (not on timing).
COMPUTED_METRICS = ("loss", "grad_norm", "nonfinite", "nonfinite_steps")


def _start_cli(workdir: str, data_dir: str, *overrides: str) -> subprocess.Popen[bytes]:
    log = open(os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log"), "ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.main",
            "--config=configs/digits.py",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            *TINY_OVERRIDES,
            *overrides,
        ],
        cwd=REPO,
        env={**os.environ, **COMPILATION_CACHE_ENV},
        stdout=log,
        stderr=log,
    )


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert process.poll() is None, f"the run exited ({process.returncode}) too early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def _checkpoint_entries(workdir: str) -> list[str]:
    try:
        return os.listdir(os.path.join(workdir, "checkpoints"))
    except FileNotFoundError:
        return []


def _saved_state_leaves(workdir: str, step: int) -> list[np.ndarray]:
    """The leaves of the 'state' item saved at `step`, read without a target structure."""
    manager = ocp.CheckpointManager(
        checkpointing.checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(read_only=True)
    )
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return [np.asarray(x) for x in jax.tree.leaves(restored["state"])]


def _computed_metrics(workdir: str) -> dict[int, dict[str, float]]:
    return {int(r["step"]): {k: r[k] for k in COMPUTED_METRICS} for r in read_metrics(str(workdir))}


@pytest.mark.slow  # four training processes, killed and rerun
def test_sigkilled_cli_run_rerun_after_each_kill_matches_uninterrupted_run_bit_for_bit(
    digits_data_dir, tmp_path
):
    steps = ["--config.training.num_train_steps=12", "--config.training.checkpoint_every=4"]
    logging_every_step = "--config.training.log_every=1"
    straight_dir, killed_dir = str(tmp_path / "straight"), str(tmp_path / "killed")
    straight = _start_cli(straight_dir, digits_data_dir, *steps, logging_every_step)

    # Kill 1: right after checkpoint 4 is complete (the run pauses after each save).
    pause = "--config.training.debug_sleep_after_save=3.0"
    run = _start_cli(killed_dir, digits_data_dir, *steps, logging_every_step, pause)
    _wait_for(lambda: "4" in _checkpoint_entries(killed_dir), run)
    run.send_signal(signal.SIGKILL)
    run.wait()
    # Kill 2: while the asynchronous save of checkpoint 8 is being written (orbax's temporary
    # directory exists), after steps 5..8 were logged; the rerun must repeat them.
    run = _start_cli(killed_dir, digits_data_dir, *steps, logging_every_step)
    _wait_for(lambda: any(n.startswith("8.") for n in _checkpoint_entries(killed_dir)), run)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert checkpointing.finished_steps(killed_dir) == [4], "the kill missed the in-flight save"
    assert max(_computed_metrics(killed_dir)) >= 5
    # The final rerun completes the run.
    run = _start_cli(killed_dir, digits_data_dir, *steps, logging_every_step)
    assert run.wait(timeout=300) == 0, open(killed_dir + ".log").read()[-3000:]
    assert straight.wait(timeout=300) == 0, open(straight_dir + ".log").read()[-3000:]

    for a, b in zip(
        _saved_state_leaves(straight_dir, 12), _saved_state_leaves(killed_dir, 12), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # metrics.jsonl is truncated to the restored step on resume: each step appears once.
    assert [r["step"] for r in read_metrics(killed_dir)] == list(range(1, 13))
    assert _computed_metrics(killed_dir) == _computed_metrics(straight_dir)


@pytest.mark.slow  # a training process stopped by SIGTERM
def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_zero(digits_data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    run = _start_cli(
        workdir,
        digits_data_dir,
        "--config.training.num_train_steps=100000",
        "--config.training.checkpoint_every=100000",
        "--config.training.log_every=1",
    )
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    def logged_two_steps() -> bool:
        if not os.path.exists(metrics_path):
            return False
        with open(metrics_path) as f:
            return f.read().count("\n") >= 2

    _wait_for(logged_two_steps, run)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 0
    log = open(workdir + ".log").read()
    assert "SIGTERM at step" in log
    last_logged = read_metrics(workdir)[-1]["step"]
    assert checkpointing.finished_steps(workdir) == [last_logged]
    assert 2 <= last_logged < 100000


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    tiny_config.training.log_every = 1
    tiny_config.training.debug_nan_steps = (3, 5, 6)
    tiny_config.training.max_consecutive_nonfinite = 2
    with pytest.raises(NonFiniteError, match="2 consecutive steps up to step 6") as e:
        train_mode.train(tiny_config, workdir)
    assert "checkpoint 3 (finite) is the latest" in str(e.value)

    records = {int(r["step"]): r for r in read_metrics(workdir)}
    assert [records[s]["nonfinite"] for s in range(1, 7)] == [0, 0, 1, 0, 1, 1]
    assert records[6]["nonfinite_steps"] == 3 and records[6]["consecutive_nonfinite"] == 2
    # Step 3 was skipped, yet checkpoint 3 was saved and is finite; step 6 was never saved.
    assert checkpointing.finished_steps(workdir) == [3]
    assert all(np.isfinite(x).all() for x in _saved_state_leaves(workdir, 3) if x.dtype.kind == "f")


@pytest.fixture
def workdir_copy(trained_tiny_run) -> str:
    """A copy of the session's finished 6-step tiny run (checkpoints 3 and 6)."""
    return trained_tiny_run[0]


def test_resume_with_a_changed_model_shape_is_refused_naming_keys_and_flag(
    tiny_config, workdir_copy
):
    tiny_config.model.ch = 64
    tiny_config.diffusion.num_timesteps = 50
    with pytest.raises(ConfigError) as raised:
        train_mode.train(tiny_config, workdir_copy)
    message = str(raised.value)
    assert "model.ch: 32 -> 64" in message and "diffusion.num_timesteps: 100 -> 50" in message
    assert "--allow_config_change" in message and "\n" not in message


@pytest.mark.slow
def test_allow_config_change_resumes_and_records_the_new_config(tiny_config, workdir_copy):
    tiny_config.diffusion.prediction = "v"  # locked, but the state's shapes are unchanged
    state = train_mode.train(tiny_config, workdir_copy, allow_config_change=True)
    assert int(state.step) == 6
    with open(os.path.join(workdir_copy, "config.json")) as f:
        assert json.load(f)["diffusion"]["prediction"] == "v"


def test_unwritable_workdir_is_refused_before_compilation(tiny_config, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before the workdir was checked")

    monkeypatch.setattr(train_state, "create_model", must_not_build)
    with pytest.raises(ConfigError, match="is not writable"):
        train_mode.train(tiny_config, str(blocker / "run"))


def _corrupt_largest_state_file(workdir: str, step: int, how: str) -> None:
    directory = os.path.join(checkpointing.checkpoint_dir(workdir), str(step), "state")
    files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
    largest = max(files, key=os.path.getsize)
    if how == "deleted":
        os.remove(largest)
    else:
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_corrupt_latest_checkpoint_falls_back_to_previous_with_a_warning(
    tiny_config, shared_tiny_run, workdir_copy, how, caplog
):
    _corrupt_largest_state_file(workdir_copy, 6, how)
    with caplog.at_level(logging.WARNING):
        state = train_mode.train(tiny_config, workdir_copy)

    assert any(
        "Checkpoint 6" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records
    )
    assert os.path.isdir(os.path.join(workdir_copy, "corrupt_checkpoints", "6"))
    assert checkpointing.finished_steps(workdir_copy) == [3, 6]
    # Resumed from 3 and retrained 4..6 exactly: the same parameters as the intact run.
    for a, b in zip(
        _saved_state_leaves(shared_tiny_run.workdir, 6),
        _saved_state_leaves(workdir_copy, 6),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 6


@pytest.mark.slow
def test_sample_mode_skips_a_corrupt_latest_checkpoint_and_leaves_it_in_place(
    tiny_config, workdir_copy, caplog
):
    _corrupt_largest_state_file(workdir_copy, 6, "truncated")
    with caplog.at_level(logging.WARNING):
        path = sample_mode.sample(tiny_config, workdir_copy)

    assert any("left it in place" in r.getMessage() for r in caplog.records)
    assert checkpointing.finished_steps(workdir_copy) == [3, 6]
    with open(path[: -len(".npz")] + ".json") as f:
        assert json.load(f)["step"] == 3


@pytest.mark.slow
def test_failed_save_raises_a_clear_error_and_keeps_the_previous_checkpoint(
    tiny_config, workdir_copy, monkeypatch
):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", disk_full)
    tiny_config.training.num_train_steps = 9
    with pytest.raises(checkpointing.CheckpointSaveError) as raised:
        train_mode.train(tiny_config, workdir_copy)
    message = str(raised.value)
    assert "saving checkpoint 9" in message and "No space left on device" in message
    assert "checkpoint 6 is intact" in message
    monkeypatch.undo()
    # The fake failure leaves orbax's coroutine of the 'meta' item unawaited: let it go here.
    del raised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gc.collect()

    assert checkpointing.finished_steps(workdir_copy) == [3, 6]
    leaves = _saved_state_leaves(workdir_copy, 6)
    assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")
