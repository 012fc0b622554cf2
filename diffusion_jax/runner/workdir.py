"""Everything the runner reads or writes in a workdir, in one place.

    <workdir>/config.json        the resolved config of the run (`write_config`, `read_config`)
    <workdir>/metrics.jsonl      one JSON object per logged step (`MetricWriter`, `read_metrics`)
    <workdir>/checkpoints/       orbax (`diffusion_jax.checkpointing`; `finished_steps`); each
                                 checkpoint also holds the config (`checkpoint_config`)
    <workdir>/train.lock         held by the training run writing there (`runner.workdir_lock`)
    <workdir>/samples|eval|edits|visualize/<name>...   outputs (`output_name` checks names)

Writes are atomic (a temporary file in the same directory, then `os.replace`; so are
`images.save_png` and `save_grid`), so a reader never sees, and a killed process never leaves,
a half-written file. In a multi-process run only the chief
(process 0) writes; every function that writes says so.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tensorboardX import SummaryWriter

from diffusion_jax import checkpointing
from diffusion_jax.errors import (
    ConfigError,
    CorruptCheckpointError,
    NoCheckpointError,
    UnsafePathError,
)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


def is_chief() -> bool:
    """Whether this process writes the workdir's files (process 0 of a multi-process run)."""
    return jax.process_index() == 0


def finished_steps(workdir: str) -> list[int]:
    """Steps of the finished checkpoints in `workdir`, ascending (empty when none)."""
    return checkpointing.finished_steps(workdir)


def latest_step(workdir: str) -> int:
    """The step of the newest finished checkpoint in `workdir` (0 when none)."""
    steps = finished_steps(workdir)
    return steps[-1] if steps else 0


# ---------------------------------------------------------------------------------------------
# Paths of outputs.


def output_name(value: str, key: str) -> str:
    """`value` checked to be a plain file name (no directory part, not '.' or '..', not
    absolute, no NUL, not blank, no surrounding spaces), so an output named by a config value
    cannot land (or delete anything) outside its directory.

    Raises `ConfigError` naming `key` otherwise.
    """
    if (
        not isinstance(value, str)
        or not value.strip()
        or value != value.strip()
        or value in (".", "..")
        or "/" in value
        or "\\" in value
        or os.sep in value
        or (os.altsep is not None and os.altsep in value)
        or "\0" in value
        or os.path.isabs(value)
    ):
        raise ConfigError(
            f"{key}={value!r} must be a plain name (letters, digits, '-', '_', '.'; no '/' or "
            "'..', not blank): it names files inside the workdir"
        )
    return value


def contained_path(root: str, *parts: str) -> str:
    """`os.path.join(root, *parts)`, checked to resolve (symlinks followed) inside `root`.

    Every write and delete of the runner goes through this, so a name that slipped past the
    config checks, or a symlink inside the workdir that leads out of it, cannot make the
    program write or delete anything elsewhere. Raises `UnsafePathError` otherwise.
    """
    path = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    resolved = os.path.realpath(path)
    if resolved == real_root or os.path.commonpath([real_root, resolved]) != real_root:
        raise UnsafePathError(
            f"{path} resolves to {resolved}, outside {real_root}; not writing or deleting "
            "there: use plain names, and replace any symlink inside the directory that leads "
            "out of it with a real directory"
        )
    return path


def check_owned_dir(path: str, root: str, owned: re.Pattern[str], *, fix: str) -> list[str]:
    """The files of the directory `path` (inside `root`; [] when it is missing), checked to be
    nothing but regular files whose names fully match `owned` (the names this program writes
    there), so that deleting them deletes nothing else.

    Raises `UnsafePathError` naming `fix` when `path` resolves outside `root`, is a symlink or
    a file, or holds anything else.
    """
    contained_path(root, os.path.relpath(path, root))
    if not os.path.lexists(path):
        return []
    if os.path.islink(path) or not os.path.isdir(path):
        raise UnsafePathError(
            f"{path} is not a directory this program wrote; not deleting it: {fix}"
        )
    try:
        with os.scandir(path) as entries:
            found = list(entries)
    except FileNotFoundError:  # removed meanwhile (by the chief of a multi-process run)
        return []
    foreign = [
        e.name for e in found if not (e.is_file(follow_symlinks=False) and owned.fullmatch(e.name))
    ]
    if foreign:
        raise UnsafePathError(
            f"{path} holds {sorted(foreign)[0]!r}, which this program did not write; not "
            f"deleting it: {fix}"
        )
    return [e.path for e in found]


def remove_owned_dir(path: str, root: str, owned: re.Pattern[str], *, fix: str) -> None:
    """Delete the directory `path` and its files after `check_owned_dir` (which raises
    `UnsafePathError`, deleting nothing, unless they are all this program's own); a missing
    `path` is fine. Files this program did not write are never deleted."""
    files = check_owned_dir(path, root, owned, fix=fix)
    if not os.path.lexists(path):
        return
    for file in files:
        os.remove(file)
    os.rmdir(path)


# ---------------------------------------------------------------------------------------------
# Atomic writes.


def _tmp_path(path: str, suffix: str = "") -> str:
    # A fixed name: a write killed half-way leaves one stale file that the next write replaces.
    return f"{path}.tmp{suffix}"


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically, creating its directory."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path: str, record: Any) -> None:
    """`record` as indented JSON (with a final newline), atomically."""
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def atomic_savez(path: str, **arrays: Any) -> None:
    """`np.savez(path, **arrays)` atomically, creating the directory."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _tmp_path(path, ".npz")  # np.savez appends .npz to names without it
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# config.json


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Save the resolved config as `<workdir>/config.json` (chief only), atomically."""
    if is_chief():
        text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
        atomic_write_text(os.path.join(workdir, CONFIG_FILE), text)


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON (what config.json holds, and each checkpoint's 'meta' record)."""
    return dict(json.loads(config.to_json_best_effort()))


def checkpoint_config(workdir: str) -> dict[str, Any] | None:
    """The config saved inside the newest checkpoint that has one (plain JSON), or None
    (checkpoints written before configs were saved in them, or no readable record)."""
    for step in reversed(finished_steps(workdir)):
        try:
            record = checkpointing.read_metadata(workdir, step)
        except CorruptCheckpointError:
            continue
        if record is not None and isinstance(record.get("config"), dict):
            return dict(record["config"])
    return None


def read_config_json(workdir: str) -> dict[str, Any] | None:
    """`<workdir>/config.json` as plain JSON, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(workdir, CONFIG_FILE)) as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved as `<workdir>/config.json`, else the one saved inside
    its newest checkpoint.

    Raises `NoCheckpointError` naming the fix when the workdir has none (or it is unreadable).
    """
    saved = read_config_json(workdir)
    if saved is None:
        saved = checkpoint_config(workdir)  # config.json deleted: the checkpoint's own copy
    if saved is None:
        raise NoCheckpointError(
            f"{workdir} has no readable {CONFIG_FILE}; train there first (python -m "
            f"experiments.main --config=... --workdir={workdir}) or pass the run's workdir"
        )
    return ml_collections.ConfigDict(_lists_to_tuples(saved))


def _lists_to_tuples(value: Any) -> Any:
    """JSON has no tuples; configs keep sequences (ch_mult, attn_resolutions) as tuples."""
    if isinstance(value, dict):
        return {k: _lists_to_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


def saved_num_train_steps(workdir: str) -> int | None:
    """`training.num_train_steps` of the run saved in `workdir`, or None."""
    try:
        return int((read_config_json(workdir) or {})["training"]["num_train_steps"])
    except (ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


class MetricWriter:
    """Appends `{"step": s, name: value, ...}` lines to metrics.jsonl and TensorBoard events;
    a no-op on every process but the chief."""

    def __init__(self, workdir: str) -> None:
        self._enabled = is_chief()
        if self._enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")
            self._tensorboard = SummaryWriter(logdir=workdir)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self._enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, float(value), global_step=int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _parse_record(line: bytes) -> dict[str, Any] | None:
    """One metrics line as a record, or None for a damaged one (cut short by a kill, not UTF-8,
    not a JSON object, or without an integer step)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    return record


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of `<workdir>/metrics.jsonl` in file order, skipping damaged lines.

    Raises FileNotFoundError when the file does not exist.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; pass the workdir of a training run")
    with open(path, "rb") as f:
        lines = [line for line in f if line.strip()]
    records = [r for r in map(_parse_record, lines) if r is not None]
    if len(records) < len(lines):
        logging.warning(
            "Skipped %d damaged line(s) of %s (cut short, not UTF-8, not a JSON object, or "
            "without an integer step)",
            len(lines) - len(records),
            path,
        )
    return records


def metric_columns(
    records: list[dict[str, Any]], keys: list[str] | tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """Records as columns: {"step": int64 (N,), key: float64 (N,), ...}; NaN where a record
    lacks a key; `keys` picks columns (default: every key seen)."""
    if keys is None:
        keys = [k for k in dict.fromkeys(k for r in records for k in r) if k != "step"]
    columns = {"step": np.array([r["step"] for r in records], np.int64)}
    for key in keys:
        columns[key] = np.array([_as_float(r.get(key)) for r in records], np.float64)
    return columns


def _as_float(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return math.nan


def final_metrics(workdir: str, keys: list[str] | tuple[str, ...]) -> dict[str, float]:
    """The last logged value of each of `keys` (absent keys left out; {} without a file)."""
    found: dict[str, float] = {}
    try:
        records = read_metrics(workdir)
    except FileNotFoundError:
        return found
    for record in records:
        found.update({k: record[k] for k in keys if k in record})
    return found


def truncate_metrics(workdir: str, step: int) -> None:
    """Keep the records up to `step` (the restored checkpoint's), so the steps a killed run
    logged after its last checkpoint, and will log again, appear once; damaged lines go too.
    Chief only."""
    path = os.path.join(workdir, METRICS_FILE)
    if not is_chief() or not os.path.exists(path):
        return
    kept = [r for r in read_metrics(workdir) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


# ---------------------------------------------------------------------------------------------
# Eval results.


def read_eval_results(workdir: str) -> list[dict[str, Any]]:
    """The eval mode's results, `<workdir>/eval/*.json`, sorted by name.

    Each is `{"name": str, "step": int, "metrics": {"fd": float, ...}, ...}`; a file without
    "name" is named after its file. Files that are not eval records are skipped.
    """
    directory = os.path.join(workdir, "eval")
    if not os.path.isdir(directory):
        return []
    results = []
    for file_name in sorted(os.listdir(directory)):
        if not file_name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, file_name)) as f:
                record = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # being written, or not an eval result
        if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
            continue
        record.setdefault("name", file_name[: -len(".json")])
        results.append(record)
    return sorted(results, key=lambda r: str(r["name"]))
