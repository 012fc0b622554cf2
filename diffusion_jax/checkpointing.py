"""Orbax checkpoints of the train state together with the data iterator's position.

A checkpoint is one orbax step directory holding three items: 'state' (`TrainState`), 'data'
(the Grain iterator state), so a resumed run sees exactly the batches it would have seen, and
'meta' (JSON): the sha256 of every state array's bytes, plus what the caller adds (the runner
adds the run's config). Orbax writes into a temporary directory and renames it when complete,
so a crash mid-save leaves the previous checkpoint as the latest (leftover temporaries are
removed), and the 'meta' record is committed together with the arrays it describes. On an
object store (a `gs://` workdir) orbax marks a finished step directory with a
`commit_success.txt` object instead; a step directory without it is an unfinished save.
Every file operation here goes through `etils.epath`, so a workdir may be local or a URL.

Faults: a checkpoint that cannot be read back (missing or garbled files, arrays that differ
from their saved sha256, non-finite values) is moved to `<workdir>/corrupt_checkpoints/<step>`
with a warning and the previous one is used (`restore_latest_readable`); checkpoints written
before 'meta' existed load without the check. A failed save (disk full, permissions) raises
`CheckpointSaveError` naming the step that failed, leaving the earlier checkpoints untouched;
a save that would not fit in the free disk space is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import parallel
from diffusion_jax.errors import CheckpointSaveError, CorruptCheckpointError, NoCheckpointError

PyTree = Any

# The JSON item saved beside the state (`read_metadata`): {"format": 1, "state_sha256":
# {path: hex}, ...the caller's keys}. Its file name is the one orbax's JsonCheckpointHandler
# gives it.
META_ITEM = "meta"
_META_FILE = "metadata"
_DIGESTS_KEY = "state_sha256"
# Free space a save needs beyond the state's bytes (metadata files, the 'meta' record).
_SAVE_MARGIN_BYTES = 1 << 20


def _is_local(path: str) -> bool:
    return "://" not in str(path)


def _root(workdir: str) -> epath.Path:
    """The workdir as an epath: local ones made absolute, URLs (gs://...) as they are."""
    return epath.Path(os.path.abspath(workdir) if _is_local(workdir) else workdir)


def checkpoint_dir(workdir: str) -> str:
    return os.fspath(_root(workdir) / "checkpoints")


def finished_steps(workdir: str) -> list[int]:
    """Steps with a complete checkpoint, ascending. Locally, orbax's in-progress saves carry a
    suffix, so directories named by a bare number are exactly the finished ones; on an object
    store they also need orbax's commit marker (`ocp.step.is_path_finalized`)."""
    directory = epath.Path(checkpoint_dir(workdir))
    if not directory.is_dir():
        return []
    names = [p.name for p in directory.iterdir() if p.name.isdigit()]
    if not _is_local(workdir):
        names = [n for n in names if ocp.step.is_path_finalized(directory / n)]
    return sorted(int(name) for name in names)


def require_checkpoint(workdir: str) -> None:
    """Raise `NoCheckpointError`, naming the fix, unless `workdir` holds a finished checkpoint."""
    if not finished_steps(workdir):
        raise NoCheckpointError(
            f"no checkpoint in {checkpoint_dir(workdir)}; train first with --mode=train and "
            "the same --workdir"
        )


class Checkpointer:
    """Saves and restores `(state, data_iterator)` pairs under `<workdir>/checkpoints`."""

    def __init__(
        self,
        workdir: str,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """metadata: JSON-serializable keys saved in every checkpoint's 'meta' record (the
        runner saves the run's config there); "format" and "state_sha256" are reserved."""
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self._workdir = workdir
        self._read_only = read_only
        self._metadata = dict(metadata or {})
        self._in_flight: int | None = None  # the step of the asynchronous save not yet waited for
        self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, data_iterator: Any | None = None) -> None:
        """Start saving `state` (and the iterator position) as `step`; returns before it is on disk
        when async. The iterator state is captured now, so the caller may keep iterating.

        Raises `CheckpointSaveError` naming the step that failed: the previous asynchronous save
        (waited for first), or this one, including when the free disk space is below the
        state's size (checked before anything is written).
        """
        self.wait_until_finished()
        self._check_free_space(step, state)
        record = {**self._metadata, "format": 1, _DIGESTS_KEY: state_digests(state)}
        items: dict[str, Any] = {
            "state": ocp.args.StandardSave(state),
            META_ITEM: ocp.args.JsonSave(record),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:  # orbax wraps I/O errors in several types; report them all
            raise self._save_error(step, error) from error
        self._in_flight = step

    def _check_free_space(self, step: int, state: PyTree) -> None:
        """Refuse a save that cannot fit: orbax would fail half-way through its background
        writes, with pages of tracebacks. Collective: every process must agree to save."""
        needed = _SAVE_MARGIN_BYTES + sum(
            int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
            for x in jax.tree.leaves(state)
            if hasattr(x, "shape") and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        )
        directory = checkpoint_dir(self._workdir)
        try:
            # An object store has no free-space figure: let the save itself report a failure.
            free = shutil.disk_usage(directory).free if _is_local(directory) else needed
        except OSError:
            free = needed  # cannot tell: let the save itself report a failure
        if parallel.any_process(free < needed):
            raise self._save_error(
                step,
                OSError(
                    f"not enough free disk space: the checkpoint needs about "
                    f"{_megabytes(needed)}, {_megabytes(free)} free on this process"
                ),
            )

    def restore(
        self,
        abstract_state: PyTree,
        data_iterator: Any | None = None,
        step: int | None = None,
    ) -> PyTree:
        """Restore the state saved at `step` (default: latest) into the shapes and shardings of
        `abstract_state`; when given, `data_iterator` is moved to the saved position in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise NoCheckpointError(f"no checkpoint in {self._manager.directory}")
        record = read_metadata(self._workdir, step)  # first: a garbled record stops here
        absent = self._absent_empty_fields(abstract_state, step)
        target = abstract_state
        if absent:  # saved before those fields existed: restore the others, keep them empty
            target = {
                f.name: getattr(abstract_state, f.name)
                for f in dataclasses.fields(abstract_state)
                if f.name not in absent
            }
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        if absent:
            state = type(abstract_state)(
                **state, **{name: getattr(abstract_state, name) for name in absent}
            )
        if record is not None and isinstance(record.get(_DIGESTS_KEY), dict):
            _verify_digests(state, record[_DIGESTS_KEY], step, checkpoint_dir(self._workdir))
        return state

    def _absent_empty_fields(self, abstract_state: PyTree, step: int) -> list[str]:
        """The fields of a dataclass state that hold no arrays (say, `posthoc_emas` with
        post-hoc EMA off) and that checkpoint `step` does not have (saved before they existed).
        An unreadable tree description gives [] (the restore itself then reports the damage)."""
        if not dataclasses.is_dataclass(abstract_state):
            return []
        empty = [
            f.name
            for f in dataclasses.fields(abstract_state)
            if not jax.tree.leaves(getattr(abstract_state, f.name))
        ]
        if not empty:
            return []
        path = os.path.join(checkpoint_dir(self._workdir), str(step), "state")
        try:
            saved = set(ocp.StandardCheckpointer().metadata(path).item_metadata.keys())
        except Exception:  # any failure to read it: leave the judgement to the restore
            return []
        return [name for name in empty if name not in saved]

    def restore_latest_readable(
        self, abstract_state: PyTree, data_iterator: Any | None = None
    ) -> PyTree | None:
        """Restore the newest checkpoint that reads back completely and holds finite values.

        Newer unreadable checkpoints are moved to `<workdir>/corrupt_checkpoints/<step>` (kept
        for inspection, and out of the way of that step being saved again) with a warning.
        Returns None when there is no checkpoint. When none is readable, nothing is moved and
        `CorruptCheckpointError` is raised.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        failures: list[tuple[int, str]] = []
        for step in steps:
            state, reason = None, ""
            try:
                state = self.restore(abstract_state, data_iterator, step=step)
                if not all_finite(state):
                    reason = "ValueError: it holds NaN or Inf values"
            except Exception as error:  # any failure to read means: try the previous one
                reason = f"{type(error).__name__}: {_first_line(error)}"
            # Collective: all processes must resume from the same step, even when only one of
            # them failed to read (say, a transient error on its host).
            if parallel.any_process(bool(reason)):
                failures.append((step, reason or "unreadable on another process"))
                continue
            self._set_aside(failures, resumed_from=step)
            return state
        if steps:
            raise CorruptCheckpointError(
                f"none of the checkpoints {sorted(steps)} in {checkpoint_dir(self._workdir)} "
                f"could be read (step {failures[0][0]}: {failures[0][1]}); if the model config "
                "changed, restore the old one, else use a new --workdir to start over"
            )
        return None

    def _set_aside(self, failures: list[tuple[int, str]], resumed_from: int) -> None:
        """Move unreadable checkpoints to `<workdir>/corrupt_checkpoints/` (process 0 moves, the
        others wait), so that their steps can be saved again; a read-only manager only warns."""
        for bad_step, reason in failures:
            if self._read_only:
                where = "left it in place (read-only)"
            elif jax.process_index() == 0:
                where = f"moved it to {self._quarantine(bad_step)}"
            else:
                where = "process 0 moves it to corrupt_checkpoints/"
            logging.warning(
                "Checkpoint %d in %s is unreadable (%s); %s; using checkpoint %d instead.",
                bad_step,
                checkpoint_dir(self._workdir),
                reason,
                where,
                resumed_from,
            )
        if failures and not self._read_only:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("diffusion_jax_quarantine")
            self._manager.reload()

    def _quarantine(self, step: int) -> str:
        target = _root(self._workdir) / "corrupt_checkpoints" / str(step)
        if target.exists():
            target = target.parent / f"{step}.{int(time.time())}"
        source = epath.Path(checkpoint_dir(self._workdir)) / str(step)
        if _is_local(self._workdir):
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)  # one rename on the same filesystem: atomic
        else:
            # An object store renames by copying every object and deleting the originals; a
            # kill half-way leaves the step in place, to be set aside again on the next run.
            _copy_tree(source, target)
            source.rmtree()
        return os.fspath(target)

    def _save_error(self, step: int, error: BaseException) -> CheckpointSaveError:
        intact = [s for s in finished_steps(self._workdir) if s != step]
        kept = f"checkpoint {intact[-1]} is intact" if intact else "no earlier checkpoint exists"
        return CheckpointSaveError(
            f"saving checkpoint {step} to {checkpoint_dir(self._workdir)} failed "
            f"({_save_failure_reason(error)}); "
            f"{kept}; free disk space or fix permissions and rerun to resume"
        )

    def wait_until_finished(self) -> None:
        """Block until the asynchronous save is on disk; `CheckpointSaveError`, naming its step,
        if it failed."""
        step, self._in_flight = self._in_flight, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            if step is None:
                step = self._manager.latest_step()
            raise self._save_error(step if step is not None else -1, error) from error

    def close(self) -> None:
        self._manager.close()


@jax.jit
def _all_finite(tree: PyTree) -> jax.Array:
    """bool (): every floating-point leaf of `tree` is finite."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def all_finite(tree: PyTree) -> bool:
    """Whether every floating-point leaf of `tree` is finite (one jitted reduction)."""
    return bool(_all_finite(tree))


def abstract_like(tree: PyTree, sharding: jax.sharding.Sharding | PyTree) -> PyTree:
    """ShapeDtypeStructs of `tree` placed with `sharding` (one sharding for every leaf, or a
    pytree of shardings matching `tree`, e.g. `parallel.state_shardings`): restoring into them
    reads a checkpoint onto any mesh, whatever mesh wrote it."""
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding
    )


def _first_line(error: BaseException) -> str:
    """The first line of `error`'s message, at most 300 characters (orbax's are paragraphs)."""
    text = str(error).splitlines()[0] if str(error) else ""
    return text if len(text) <= 300 else text[:297] + "..."


def _save_failure_reason(error: BaseException) -> str:
    """The operating system's reason when a (tensorstore) message carries one, as in
    `... Failed to write 1375641 bytes to file 9: No space left on device [os_error_code='28']`,
    whose paragraph of paths would otherwise hide it; else the error's first line."""
    match = re.search(r"os_error_code='?(\d+)", str(error))
    if match:
        return f"{os.strerror(int(match.group(1)))} [errno {match.group(1)}]"
    return f"{type(error).__name__}: {_first_line(error)}"


def _megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def _leaf_path(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def state_digests(state: PyTree) -> dict[str, str]:
    """{leaf path ('ema_params/conv_in/kernel'): sha256 hex of its bytes} of every array leaf.

    The bytes are the whole (global) array in C order, as `np.asarray` gives them on the host;
    collective when a leaf spans several processes (every process must call it).
    """
    digests = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        value = leaf
        if isinstance(value, jax.Array):
            if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
                value = jax.random.key_data(value)
            value = parallel.to_host(value)
        host = np.ascontiguousarray(np.asarray(value))
        digests[_leaf_path(path)] = hashlib.sha256(host.tobytes()).hexdigest()
    return digests


def _verify_digests(state: PyTree, saved: Mapping[str, Any], step: int, directory: str) -> None:
    """Raise `CorruptCheckpointError` when a restored array's bytes differ from the sha256
    saved with it. Arrays of only one side (a field added since) are not compared."""
    restored = state_digests(state)
    differ = [path for path, digest in restored.items() if path in saved and saved[path] != digest]
    if differ:
        which = (
            f"{differ[0]} and {len(differ) - 1} more arrays differ from the sha256 saved with them"
            if len(differ) > 1
            else f"{differ[0]} differs from the sha256 saved with it"
        )
        raise CorruptCheckpointError(
            f"checkpoint {step} in {directory} was damaged on disk: {which}"
        )


def read_metadata(workdir: str, step: int) -> dict[str, Any] | None:
    """The 'meta' record saved with checkpoint `step` (the state's sha256 digests and the
    caller's keys), or None for a checkpoint written before records existed.

    Raises `CorruptCheckpointError` when the record exists but cannot be read.
    """
    path = epath.Path(checkpoint_dir(workdir)) / str(step) / META_ITEM / _META_FILE
    if not path.parent.is_dir():
        return None
    try:
        with path.open() as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(
            f"checkpoint {step} in {checkpoint_dir(workdir)} has an unreadable {META_ITEM} "
            f"record ({type(error).__name__}: {_first_line(error)})"
        ) from None
    if not isinstance(record, dict):
        raise CorruptCheckpointError(
            f"checkpoint {step} in {checkpoint_dir(workdir)} has a damaged {META_ITEM} record"
        )
    return record


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
    """Copy the directory `source` (files and subdirectories) to `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
        if child.is_dir():
            _copy_tree(child, target / child.name)
        else:
            child.copy(target / child.name, overwrite=True)
