"""Everything the runner reads or writes in a workdir, in one place.

    <workdir>/config.json        the resolved config of the run (`write_config`, `read_config`)
    <workdir>/metrics.jsonl      one JSON object per logged step (`MetricWriter`, `read_metrics`)
    <workdir>/checkpoints/       orbax (`diffusion_jax.checkpointing`; `finished_steps`); each
                                 checkpoint also holds the config (`checkpoint_config`)
    <workdir>/train.lock         held by the training run writing there (`runner.workdir_lock`)
    <workdir>/samples|eval|edits|visualize/<name>...   outputs (`output_name` checks names)

A workdir is a local path or an object-store URL (`gs://bucket/run`, `s3://...`): every read,
write, listing, rename and delete here goes through `etils.epath` (docs/storage.md).

Writes are atomic, so a reader never sees, and a killed process never leaves, a half-written
file: on a local disk a temporary file in the same directory, then `os.replace`; on an object
store one upload of the final name, which the store makes visible whole or not at all (a rename
there is a copy and a delete). In a multi-process run only the chief (process 0) writes; every
function that writes says so.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import re
import uuid
from collections.abc import Mapping
from typing import IO, Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from tensorboardX import SummaryWriter, record_writer

from diffusion_jax import checkpointing, images
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


def is_local(path: str) -> bool:
    """Whether `path` is on a local (POSIX) filesystem, not an object-store URL like gs://."""
    return "://" not in str(path)


def join(root: str, *parts: str) -> str:
    """`root` joined with `parts`: `os.path.join` locally, '/'-joined for a URL."""
    return os.path.join(root, *parts) if is_local(root) else posixpath.join(str(root), *parts)


def dirname(path: str) -> str:
    return os.path.dirname(path) if is_local(path) else posixpath.dirname(path)


def contained_path(root: str, *parts: str) -> str:
    """`join(root, *parts)`, checked to lie inside `root`.

    Every write and delete of the runner goes through this, so a name that slipped past the
    config checks, or a symlink inside the workdir that leads out of it, cannot make the
    program write or delete anything elsewhere. A local path is resolved (symlinks followed);
    an object-store URL, which has no symlinks, is normalised ('.' and '..' folded) and must
    keep `root`'s scheme, bucket and prefix. Raises `UnsafePathError` otherwise.
    """
    path = join(root, *parts)
    if is_local(root):
        real_root = os.path.realpath(root)
        resolved = os.path.realpath(path)
        inside = resolved != real_root and os.path.commonpath([real_root, resolved]) == real_root
    else:
        real_root, normal = str(_normalised_url(str(root))), _normalised_url(path)
        inside = normal is not None and normal.startswith(real_root + "/")
        resolved = normal or "a place above the bucket"
    if not inside:
        raise UnsafePathError(
            f"{path} resolves to {resolved}, outside {real_root}; not writing or deleting "
            "there: use plain names, and replace any symlink inside the directory that leads "
            "out of it with a real directory"
        )
    return path


def _normalised_url(url: str) -> str | None:
    """`scheme://bucket/a/./b/../c//` as `scheme://bucket/a/c` ('.', '..' and repeated '/'
    folded), or None when a '..' climbs above the bucket."""
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    parts: list[str] = []
    for part in key.split("/"):
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join([f"{scheme}://{bucket}", *parts])


def check_owned_dir(path: str, root: str, owned: re.Pattern[str], *, fix: str) -> list[str]:
    """The files of the directory `path` (inside `root`; [] when it is missing), checked to be
    nothing but regular files whose names fully match `owned` (the names this program writes
    there), so that deleting them deletes nothing else.

    Raises `UnsafePathError` naming `fix` when `path` lies outside `root`, is a symlink or
    a file, or holds anything else (on an object store: anything under a sub-prefix).
    """
    if is_local(root):
        contained_path(root, os.path.relpath(path, root))
    else:
        resolved, real_root = _normalised_url(path), _normalised_url(root)
        if resolved is None or not resolved.startswith(f"{real_root}/"):
            raise UnsafePathError(f"{path} lies outside {real_root}; not deleting it: {fix}")
    if not is_local(path):
        return _check_owned_prefix(epath.Path(path), owned, fix=fix)
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


def _check_owned_prefix(path: epath.Path, owned: re.Pattern[str], *, fix: str) -> list[str]:
    """`check_owned_dir` on an object store: objects directly under `path/`, no sub-prefix."""
    if not path.exists():
        return []
    if not path.is_dir():
        raise UnsafePathError(
            f"{path} is not a directory this program wrote; not deleting it: {fix}"
        )
    try:
        found = list(path.iterdir())
    except FileNotFoundError:  # removed meanwhile (by the chief of a multi-process run)
        return []
    foreign = [p.name for p in found if p.is_dir() or not owned.fullmatch(p.name)]
    if foreign:
        raise UnsafePathError(
            f"{path} holds {sorted(foreign)[0]!r}, which this program did not write; not "
            f"deleting it: {fix}"
        )
    return [os.fspath(p) for p in found]


def remove_owned_dir(path: str, root: str, owned: re.Pattern[str], *, fix: str) -> None:
    """Delete the directory `path` and its files after `check_owned_dir` (which raises
    `UnsafePathError`, deleting nothing, unless they are all this program's own); a missing
    `path` is fine. Files this program did not write are never deleted. On an object store
    the objects are deleted one by one (the prefix vanishes with its last object)."""
    files = check_owned_dir(path, root, owned, fix=fix)
    if not is_local(path):
        for file in files:
            epath.Path(file).unlink(missing_ok=True)
        return
    if not os.path.lexists(path):
        return
    for file in files:
        os.remove(file)
    os.rmdir(path)


# ---------------------------------------------------------------------------------------------
# Atomic writes and reads.


def _tmp_path(path: str, suffix: str = "") -> str:
    # A fixed name: a write killed half-way leaves one stale file that the next write replaces.
    return f"{path}.tmp{suffix}"


def makedirs(path: str) -> None:
    """Create the directory `path` and its parents (a no-op for object-store prefixes that a
    write creates implicitly, but harmless there)."""
    if is_local(path):
        os.makedirs(path, exist_ok=True)
    else:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically, creating its directory: locally a temporary file
    beside it, then `os.replace`; on an object store one upload of the final name (the
    store's atomic unit: readers see the old object or the new one, never a part)."""
    if not is_local(path):
        epath.Path(path).write_bytes(data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically, creating its directory."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, record: Any) -> None:
    """`record` as indented JSON (with a final newline), atomically."""
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def atomic_savez(path: str, **arrays: Any) -> None:
    """`np.savez(path, **arrays)` atomically, creating the directory."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def write_png(path: str, image: np.ndarray, *, scale: int = 1) -> None:
    """`images.encode_png(image, scale=scale)` written to `path` atomically."""
    atomic_write_bytes(path, images.encode_png(image, scale=scale))


def write_grid(path: str, tiles: np.ndarray, *, ncols: int | None = None) -> None:
    """`images.encode_grid(tiles, ncols=ncols)` written to `path` atomically."""
    atomic_write_bytes(path, images.encode_grid(tiles, ncols=ncols))


def load_npz(path: str) -> Any:
    """`np.load` of the .npz at `path` (local or object store), read whole into memory; use it
    as a context manager like np.load's NpzFile."""
    return np.load(io.BytesIO(epath.Path(path).read_bytes()))


def remove_file(path: str) -> None:
    """Delete the file `path` (missing is fine)."""
    epath.Path(path).unlink(missing_ok=True)


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def lexists(path: str) -> bool:
    """Whether `path` exists; locally a dangling symlink counts (`os.path.lexists`)."""
    return os.path.lexists(path) if is_local(path) else exists(path)


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir()


def open_file(path: str, mode: str = "r") -> IO[Any]:
    """`open(path, mode)` for a local path or an object-store URL ('r' and 'rb' here; writes
    go through the atomic functions above)."""
    return epath.Path(path).open(mode)


def listdir(path: str) -> list[str]:
    """The names in the directory `path` (FileNotFoundError when it does not exist)."""
    directory = epath.Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    return [p.name for p in directory.iterdir()]


# ---------------------------------------------------------------------------------------------
# config.json


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Save the resolved config as `<workdir>/config.json` (chief only), atomically."""
    if is_chief():
        text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
        atomic_write_text(join(workdir, CONFIG_FILE), text)


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
        with open_file(join(workdir, CONFIG_FILE)) as f:
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
    a no-op on every process but the chief.

    Object stores cannot append: there metrics.jsonl is read and uploaded whole (atomically)
    with the new line at every `write`, and TensorBoard's event file is held and uploaded whole
    at every flush (`_ObjectFile`).
    """

    def __init__(self, workdir: str) -> None:
        self._enabled = is_chief()
        if self._enabled:
            makedirs(workdir)
            path = join(workdir, METRICS_FILE)
            self._jsonl: IO[str] | _ObjectFile
            suffix = ""
            if is_local(workdir):
                self._jsonl = open(path, "a")
            else:
                self._jsonl = _ObjectFile(path, shared=True)
                _register_tensorboard_backend(workdir)
                # Event files are named after the second and the host, and each is uploaded
                # whole: a writer started within the same second must not replace another's.
                suffix = f".{uuid.uuid4().hex[:8]}"
            self._tensorboard = SummaryWriter(logdir=str(workdir), filename_suffix=suffix)

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


class _ObjectFile:
    """Appending to an object on a store that cannot append: `write` holds the bytes, `flush`
    and `close` upload the object whole (`atomic_write_bytes`).

    shared=False: this writer owns the object (an event file of its own name) and uploads what
    it holds. shared=True (metrics.jsonl, which an eval may log to while training runs): each
    flush reads the object again and uploads it with the new bytes added, so another writer's
    lines are kept unless two flushes interleave within one round trip.
    """

    def __init__(self, path: str, *, shared: bool = False) -> None:
        self.path = path
        self._shared = shared
        self._data = bytearray()  # shared: the bytes not uploaded yet; else all of them
        self._uploaded = -1

    def write(self, data: str | bytes) -> None:
        self._data += data.encode("utf-8") if isinstance(data, str) else data

    def flush(self) -> None:
        if self._shared:
            if self._data:
                current = epath.Path(self.path).read_bytes() if exists(self.path) else b""
                atomic_write_bytes(self.path, current + bytes(self._data))
                self._data.clear()
        elif self._uploaded != len(self._data):
            atomic_write_bytes(self.path, bytes(self._data))
            self._uploaded = len(self._data)

    def close(self) -> None:
        self.flush()


class _ObjectFileFactory:
    """tensorboardX's writer factory for one URL scheme: event files as `_ObjectFile`s, so
    TensorBoard's events reach the store through epath like every other file."""

    def open(self, path: str) -> _ObjectFile:
        return _ObjectFile(path)

    def directory_check(self, path: str) -> None:
        makedirs(path)


def _register_tensorboard_backend(url: str) -> None:
    """Send tensorboardX's event files for `url`'s scheme (gs, s3, ...) through epath."""
    record_writer.register_writer_factory(url.split("://")[0], _ObjectFileFactory())


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
    path = join(workdir, METRICS_FILE)
    if not exists(path):
        raise FileNotFoundError(f"{path} does not exist; pass the workdir of a training run")
    with open_file(path, "rb") as f:
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
    path = join(workdir, METRICS_FILE)
    if not is_chief() or not exists(path):
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
    directory = join(workdir, "eval")
    if not isdir(directory):
        return []
    results = []
    for file_name in sorted(listdir(directory)):
        if not file_name.endswith(".json"):
            continue
        try:
            with open_file(join(directory, file_name)) as f:
                record = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # being written, or not an eval result
        if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
            continue
        record.setdefault("name", file_name[: -len(".json")])
        results.append(record)
    return sorted(results, key=lambda r: str(r["name"]))
