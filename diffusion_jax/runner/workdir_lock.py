"""One writer per workdir: a lock file held while a run writes there.

    with workdir_lock.hold(os.path.join(workdir, "train.lock"), what="training run",
                           fix="..."):
        ...train...

The lock is an `fcntl.flock` on the file, which records its holder (pid, host, start time) for
the message a second writer gets (`WorkdirLockedError`). The kernel drops a flock when its
process dies, however it dies (SIGKILL included), so a lock file whose flock is free was left by
a process that is gone: it is taken over with a warning. On a filesystem without flock support
the record decides: a holder on this host whose pid is not running is stale; one on another host
is trusted. The holder removes the file when it is done.

On an object store (a gs:// workdir) there is no flock, and no way to tell from one host
whether a process on another still runs: the lock is then an advisory object holding the same
record. A holder on this host whose pid runs refuses the second run; any other holder is taken
over with a warning, and every run there warns once that keeping one job per workdir is the
scheduler's job (docs/storage.md). Preempted jobs come back on other hosts, so trusting
another host's record, as on a local filesystem without flock, would lock a workdir forever.

Multi-process runs: only the chief (process 0) takes the lock; the others learn whether it got
it (a collective), so they stop too instead of waiting for the chief forever.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from absl import logging
from etils import epath

from diffusion_jax import parallel
from diffusion_jax.errors import WorkdirLockedError
from diffusion_jax.runner import workdir as workdir_lib

# errno values of a filesystem that does not implement flock.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
        if isinstance(started, int | float)
        else "an unknown time"
    )
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"


def _read_holder(fd: int) -> dict[str, Any]:
    """The record in the lock file ({} when empty or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return _parse_holder(os.read(fd, 65536))
    except OSError:
        return {}


def _parse_holder(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data.decode("utf-8") or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _holder_record() -> bytes:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    return (json.dumps(record) + "\n").encode()


def _pid_running(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """An exclusive lock on `path` for one process; `acquire` raises `WorkdirLockedError`
    (naming the holder and `fix`) when another process holds it."""

    def __init__(self, path: str, *, what: str, fix: str) -> None:
        self.path = path
        self._what = what
        self._fix = fix
        self._fd: int | None = None
        self._object = False

    def acquire(self) -> None:
        if not workdir_lib.is_local(self.path):
            self._acquire_object()
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                flock_works = self._flock(fd)
                # The previous holder may have removed the file between our open and flock:
                # then we locked a file nobody else sees. Start over on the current one.
                try:
                    same_file = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same_file = False
                if same_file:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        previous = _read_holder(fd)
        if not flock_works and previous and not self._stale(previous):
            os.close(fd)
            raise self._locked_error(previous)
        if previous:
            logging.warning(
                "Taking over %s: its holder (%s) is no longer running.",
                self.path,
                _describe(previous),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_record(), 0)
        os.fsync(fd)
        self._fd = fd

    def _acquire_object(self) -> None:
        """The advisory lock of an object store (see the module docstring)."""
        path = epath.Path(self.path)
        previous = _parse_holder(path.read_bytes()) if path.exists() else {}
        if previous and previous.get("host") == socket.gethostname() and not self._stale(previous):
            raise self._locked_error(previous)
        logging.warning(
            "%s is on an object store, which has no file locks: %s only records its holder, "
            "and a run on another host is not kept out. Run one job per workdir (the "
            "scheduler's job).",
            workdir_lib.dirname(self.path),
            self.path,
        )
        if previous:
            logging.warning(
                "Taking over %s from %s: on an object store it cannot be told whether that "
                "run still writes here; if it does, stop one of the two.",
                self.path,
                _describe(previous),
            )
        workdir_lib.atomic_write_bytes(self.path, _holder_record())
        self._object = True

    def _flock(self, fd: int) -> bool:
        """Take the flock without waiting: True when taken, False when the filesystem has no
        flock; raises `WorkdirLockedError` when another process holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._locked_error(_read_holder(fd)) from None
        except OSError as error:
            if error.errno in _NO_FLOCK:
                return False
            raise
        return True

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        """Without flock: a holder on this host whose pid is gone (or is us) is stale."""
        if holder.get("host") != socket.gethostname():
            return False
        return holder.get("pid") == os.getpid() or not _pid_running(holder.get("pid"))

    def _locked_error(self, holder: dict[str, Any]) -> WorkdirLockedError:
        who = _describe(holder) if holder else "a process that has not written its pid yet"
        return WorkdirLockedError(
            f"{workdir_lib.dirname(self.path) or '.'} is in use by another {self._what} ({who}; "
            f"lock {self.path}); {self._fix}"
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._object:
            self._object = False
            workdir_lib.remove_file(self.path)
            return
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # while still locked: nobody takes over a file about to vanish
        os.close(fd)


@contextlib.contextmanager
def hold(path: str, *, what: str, fix: str) -> Iterator[None]:
    """Hold the lock at `path` within the block (chief only; see the module docstring).

    Raises `WorkdirLockedError` on every process when the chief cannot take it.
    """
    lock = WorkdirLock(path, what=what, fix=fix)
    error: WorkdirLockedError | None = None
    if workdir_lib.is_chief():
        try:
            lock.acquire()
        except WorkdirLockedError as raised:
            error = raised
    if parallel.any_process(error is not None):
        raise error or WorkdirLockedError(
            f"process 0 could not lock {path}: another {what} holds it (see process 0's error)"
        )
    try:
        yield
    finally:
        lock.release()
