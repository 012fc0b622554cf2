"""Orbax checkpoints of the train state together with the data iterator's position.

A checkpoint is one orbax step directory holding two items: 'state' (`TrainState`) and
'data' (the Grain iterator state), so a resumed run sees exactly the batches it would have
seen. Orbax writes into a temporary directory and renames it when complete, so a crash
mid-save leaves the previous checkpoint as the latest; leftover temporaries are removed.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

PyTree = Any


class NoCheckpointError(FileNotFoundError):
    """Raised when a mode that needs a trained model finds no checkpoint in the workdir."""


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

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True) -> None:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, data_iterator: Any | None = None) -> None:
        """Start saving `state` (and the iterator position) as `step`; returns before it is on disk
        when async. The iterator state is captured now, so the caller may keep iterating."""
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

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

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_like(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
    """ShapeDtypeStructs of `tree` placed with `sharding`: restores onto any device count."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
