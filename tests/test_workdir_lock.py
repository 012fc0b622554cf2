"""One writer per workdir: a second trainer (or a second eval of the same name) is refused
naming the holder; a lock left by a killed process is taken over; the lock goes with the run."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from diffusion_jax import checkpointing, train_state
from diffusion_jax.errors import WorkdirLockedError
from diffusion_jax.runner import evaluate, workdir_lock
from diffusion_jax.runner import train as train_mode
from tests.conftest import COMPILATION_CACHE_ENV, TINY_OVERRIDES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _must_not_build(*args, **kwargs):
    raise AssertionError("the model was built although the workdir is locked")


def _hold(path: str) -> workdir_lock.WorkdirLock:
    """The lock at `path`, held through its own open file (another flock, as another process's
    would be)."""
    lock = workdir_lock.WorkdirLock(path, what="training run", fix="...")
    lock.acquire()
    return lock


def _dead_pid() -> int:
    """The pid of a process that has exited (as a killed trainer's has)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_second_trainer_is_refused_in_one_line_naming_the_holder(
    tiny_config, tmp_path, monkeypatch
):
    workdir = str(tmp_path / "run")
    holder = _hold(os.path.join(workdir, "train.lock"))
    monkeypatch.setattr(train_state, "create_model", _must_not_build)
    try:
        with pytest.raises(WorkdirLockedError) as raised:
            train_mode.train(tiny_config, workdir)
    finally:
        holder.release()
    message = str(raised.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started 20" in message
    assert "is in use by another training run" in message and "\n" not in message
    assert "use another --workdir" in message


def test_the_lock_of_a_killed_trainer_is_taken_over_with_a_warning(trained_tiny_run, caplog):
    workdir, config = trained_tiny_run
    lock_path = os.path.join(workdir, "train.lock")
    dead = _dead_pid()
    with open(lock_path, "w") as f:  # what a SIGKILL leaves: the record, and no flock
        json.dump({"pid": dead, "host": socket.gethostname(), "started": time.time()}, f)

    with caplog.at_level(logging.WARNING):
        state = train_mode.train(config, workdir)  # already at step 6: restores, returns
    assert int(state.step) == 6
    taken = [r.getMessage() for r in caplog.records if "Taking over" in r.getMessage()]
    assert len(taken) == 1 and f"pid {dead}" in taken[0] and "no longer running" in taken[0]
    assert not os.path.exists(lock_path)  # released when the run ended


@pytest.mark.slow
def test_the_lock_is_released_when_sigterm_stops_training(tiny_config, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    tiny_config.training.num_train_steps = 1000
    save = checkpointing.Checkpointer.save

    def save_then_sigterm(self, step, *args, **kwargs):
        assert os.path.exists(os.path.join(workdir, "train.lock"))  # held while training
        save(self, step, *args, **kwargs)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.WARNING):
        patch.setattr(checkpointing.Checkpointer, "save", save_then_sigterm)
        state = train_mode.train(tiny_config, workdir)
    assert int(state.step) == 3  # stopped before step 4; checkpoint 3 already holds it
    assert any("SIGTERM at step 3" in r.getMessage() for r in caplog.records)
    assert checkpointing.finished_steps(workdir) == [3]
    assert not os.path.exists(os.path.join(workdir, "train.lock"))


def test_a_failed_run_releases_the_lock(tiny_config, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    monkeypatch.setattr(train_state, "create_model", _must_not_build)
    with pytest.raises(AssertionError):
        train_mode.train(tiny_config, workdir)
    assert not os.path.exists(os.path.join(workdir, "train.lock"))
    lock = workdir_lock.WorkdirLock(os.path.join(workdir, "train.lock"), what="x", fix="y")
    lock.acquire()  # free again
    lock.release()


@pytest.mark.slow
def test_a_second_eval_of_the_same_name_is_refused(trained_tiny_run):
    workdir, config = trained_tiny_run
    config.eval.num_samples, config.eval.batch_size, config.eval.shard_size = 10, 4, 5
    config.eval.metrics, config.eval.bpd_num_images = ("is",), 0
    name = evaluate.eval_name(config)
    lock_path = os.path.join(workdir, "eval", name + ".lock")
    holder = _hold(lock_path)
    try:
        with pytest.raises(WorkdirLockedError) as raised:
            evaluate.evaluate(config, workdir)
    finally:
        holder.release()
    assert f"another eval making the same samples ({name})" in str(raised.value)
    assert f"pid {os.getpid()}" in str(raised.value)
    assert not os.path.exists(os.path.join(workdir, "eval", name, "shard_00000.npz"))
    evaluate.evaluate(config, workdir)  # the first one finished: this one runs
    assert not os.path.exists(lock_path)


def test_lock_file_replaced_between_open_and_flock_is_not_shared(tmp_path, monkeypatch):
    """A holder releasing (removing the file) just as another process opens it must not leave
    two holders: the late one retries on the file that exists now."""
    path = str(tmp_path / "train.lock")
    first = workdir_lock.WorkdirLock(path, what="training run", fix="...")
    first.acquire()
    flock = fcntl.flock
    calls = []

    def release_first_then_flock(fd, operation):
        if not calls:  # the first attempt: the holder lets go after our open
            first.release()
        calls.append(fd)
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", release_first_then_flock)
    second = workdir_lock.WorkdirLock(path, what="training run", fix="...")
    second.acquire()
    assert len(calls) >= 2  # retried on the new file
    assert json.load(open(path))["pid"] == os.getpid()
    monkeypatch.undo()
    third = workdir_lock.WorkdirLock(path, what="training run", fix="...")
    with pytest.raises(WorkdirLockedError):
        third.acquire()
    second.release()


@pytest.mark.parametrize("holder_alive", [True, False])
def test_without_flock_support_a_live_holder_on_this_host_is_trusted_and_a_dead_one_is_stale(
    tmp_path, monkeypatch, holder_alive
):
    path = str(tmp_path / "train.lock")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if not holder_alive:
        sleeper.kill()
        sleeper.wait()
    record = {"pid": sleeper.pid, "host": socket.gethostname(), "started": time.time()}
    with open(path, "w") as f:
        json.dump(record, f)

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = workdir_lock.WorkdirLock(path, what="training run", fix="...")
    try:
        if holder_alive:
            with pytest.raises(WorkdirLockedError, match=f"pid {sleeper.pid}"):
                lock.acquire()
        else:
            lock.acquire()
            assert json.load(open(path))["pid"] == os.getpid()
            lock.release()
    finally:
        sleeper.kill()
        sleeper.wait()


def _cli(workdir: str, data_dir: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.main",
        "--config=configs/digits.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *TINY_OVERRIDES,
        *overrides,
    ]


@pytest.mark.slow  # three training processes, one killed
def test_cli_second_trainer_is_refused_and_the_lock_of_a_killed_one_is_taken_over(
    digits_data_dir, tmp_path
):
    workdir = str(tmp_path / "run")
    lock_path = os.path.join(workdir, "train.lock")
    env = {**os.environ, **COMPILATION_CACHE_ENV}
    long_run = ["--config.training.num_train_steps=100000", "--config.training.checkpoint_every=3"]
    first = subprocess.Popen(
        _cli(workdir, digits_data_dir, *long_run),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not checkpointing.finished_steps(workdir):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        second = subprocess.run(
            _cli(workdir, digits_data_dir), cwd=REPO, env=env, capture_output=True, text=True
        )
        assert second.returncode == 1
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, second.stderr[-3000:]
        assert f"is in use by another training run (pid {first.pid} on host" in errors[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.load(open(lock_path))["pid"] == first.pid  # left behind by the kill

    steps = checkpointing.finished_steps(workdir)
    third = subprocess.run(
        _cli(workdir, digits_data_dir, f"--config.training.num_train_steps={steps[-1] + 1}"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"Taking over {lock_path}: its holder (pid {first.pid}" in third.stderr
    assert f"Resumed from step {steps[-1]}" in third.stderr
    assert not os.path.exists(lock_path)
