"""Orbax checkpoints of the train state together with the data iterator's position.

A checkpoint is one orbax step directory holding two items: 'state' (`TrainState`) and
'data' (the Grain iterator state), so a resumed run sees exactly the batches it would have
seen. Orbax writes into a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoint as the latest; leftover temporaries are removed.

Faults: a checkpoint that cannot be read back (missing or garbled files, non-finite values) is
moved to `<workdir>/corrupt_checkpoints/<step>` with a warning and the previous one is used
(`restore_latest_readable`); a failed save (disk full, permissions) raises
`CheckpointSaveError`, leaving the earlier checkpoints untouched.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import parallel
from diffusion_jax.errors import CheckpointSaveError, CorruptCheckpointError, NoCheckpointError

PyTree = Any


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def finished_steps(workdir: str) -> list[int]:
    """Steps with a complete checkpoint, ascending. Orbax's in-progress saves carry a suffix, so
    directories named by a bare number are exactly the finished ones."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


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
    ) -> None:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self._workdir = workdir
        self._read_only = read_only
        self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, data_iterator: Any | None = None) -> None:
        """Start saving `state` (and the iterator position) as `step`; returns before it is on disk
        when async. The iterator state is captured now, so the caller may keep iterating.

        Raises `CheckpointSaveError` when this save, or the previous asynchronous one, failed.
        """
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:  # orbax wraps I/O errors in several types; report them all
            raise self._save_error(step, error) from error

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
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

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
                message = str(error).splitlines()[0] if str(error) else ""
                reason = f"{type(error).__name__}: {message}"
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
        target = os.path.join(os.path.abspath(self._workdir), "corrupt_checkpoints", str(step))
        if os.path.exists(target):
            target += f".{int(time.time())}"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(os.path.join(checkpoint_dir(self._workdir), str(step)), target)
        return target

    def _save_error(self, step: int, error: BaseException) -> CheckpointSaveError:
        intact = [s for s in finished_steps(self._workdir) if s != step]
        kept = f"checkpoint {intact[-1]} is intact" if intact else "no earlier checkpoint exists"
        return CheckpointSaveError(
            f"saving checkpoint {step} to {checkpoint_dir(self._workdir)} failed "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            f"{kept}; free disk space or fix permissions and rerun to resume"
        )

    def wait_until_finished(self) -> None:
        """Block until the asynchronous save is on disk; `CheckpointSaveError` if it failed."""
        step = self._manager.latest_step()
        try:
            self._manager.wait_until_finished()
        except Exception as error:
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


def abstract_like(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
    """ShapeDtypeStructs of `tree` placed with `sharding`: restores onto any device count."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
