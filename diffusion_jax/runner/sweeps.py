"""Sweeps over config values: describe, expand, name, validate, check completion, tabulate.

A sweep file (`configs/sweeps/*.py`) defines `get_sweep()` built from three composable helpers:

    product(sweep("diffusion.prediction", ["eps", "v"]),
            sweep("diffusion.schedule", ["linear", "cosine"]))
    # 4 points, the last factor varying fastest:
    # {prediction: eps, schedule: linear}, {eps, cosine}, {v, linear}, {v, cosine}
    zip_(sweep("training.learning_rate", [1e-3, 3e-4]), sweep("training.warmup_steps", [100, 500]))
    # 2 points, values paired in order
    chain(a, b)  # the points of a, then those of b

A point is a dict of config overrides `{"diffusion.prediction": "v", ...}`. Its workdir is
`<sweep dir>/<point_names(...)[i]>`, e.g. `prediction=v,schedule=cosine`: stable as long as the
sweep's keys and values are. `experiments/sweep.py` runs the points; this module holds what
does not run anything, so notebooks (`diffusion_jax.analysis`) can read sweeps too.

Files of a sweep directory: `sweep.json` (the points, written before training), one workdir per
point, `results.csv` and `results.md` (one row per point: its overrides, status, latest
checkpoint step, final training metrics and the eval results of `<point>/eval/*.json`), each
point's row as a TensorBoard HParams session in `<point>/hparams/` (`write_hparams`), and the
backends' logs (`logs/`, `slurm/`; `sweep_backends` runs the points).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import itertools
import json
import math
import os
import re
import runpy
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections

from diffusion_jax.errors import ConfigError
from diffusion_jax.runner import workdir as workdir_lib

Point = dict[str, Any]

# Columns of the results table that are not overrides or metrics.
POINT_COLUMN, STATUS_COLUMN, STEP_COLUMN = "point", "status", "step"
DEFAULT_TRAIN_METRICS = ("loss",)
_MAX_NAME_LENGTH = 120  # well under the 255-byte file-name limit, still readable in a listing


class SweepError(ConfigError):
    """A sweep description or sweep key that cannot work; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """An ordered sequence of points (dicts of config overrides); build with the helpers."""

    points: tuple[Point, ...]

    def __iter__(self) -> Iterator[Point]:
        return (dict(p) for p in self.points)

    def __len__(self) -> int:
        return len(self.points)

    @property
    def keys(self) -> list[str]:
        """The overridden keys, in order of first appearance."""
        return list(dict.fromkeys(k for p in self.points for k in p))


def sweep(key: str, values: Iterable[Any]) -> Sweep:
    """One point per value of the dotted config `key` (lists become tuples, as configs use)."""
    values = list(values)
    if not values:
        raise SweepError(f"sweep({key!r}, ...) got no values; give at least one")
    return Sweep(tuple({key: _as_config_value(v)} for v in values))


def product(*sweeps: Sweep) -> Sweep:
    """Every combination of the sweeps' points; the last sweep varies fastest."""
    _check_disjoint("product", sweeps)
    return Sweep(tuple(_merge(combo) for combo in itertools.product(*(s.points for s in sweeps))))


def zip_(*sweeps: Sweep) -> Sweep:
    """The i-th points of all sweeps merged, for i in order; the sweeps must be equally long."""
    _check_disjoint("zip_", sweeps)
    if len({len(s) for s in sweeps}) > 1:
        lengths = ", ".join(f"{len(s)} ({','.join(s.keys)})" for s in sweeps)
        raise SweepError(f"zip_ needs sweeps of equal length, got {lengths}; use product instead")
    return Sweep(tuple(_merge(combo) for combo in zip(*(s.points for s in sweeps), strict=True)))


def chain(*sweeps: Sweep) -> Sweep:
    """The points of each sweep in turn (e.g. one ablation per model size)."""
    return Sweep(tuple(p for s in sweeps for p in s.points))


def _check_disjoint(helper: str, sweeps: Sequence[Sweep]) -> None:
    seen: set[str] = set()
    for s in sweeps:
        if not isinstance(s, Sweep):
            raise SweepError(f"{helper} takes sweeps (from sweep(), product(), ...), got {s!r}")
        if clash := seen & set(s.keys):
            raise SweepError(f"{helper} got key {sorted(clash)[0]!r} twice; sweep each key once")
        seen |= set(s.keys)


def _merge(points: Iterable[Point]) -> Point:
    merged: Point = {}
    for point in points:
        merged.update(point)
    return merged


def _as_config_value(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_as_config_value(v) for v in value)
    return value


def load_sweep(path: str) -> Sweep:
    """The `Sweep` returned by `get_sweep()` of the Python file at `path`."""
    if not os.path.isfile(path):
        raise SweepError(f"--sweep={path} does not exist; pass a file such as configs/sweeps/*.py")
    get_sweep = runpy.run_path(path).get("get_sweep")
    if get_sweep is None:
        raise SweepError(f"{path} defines no get_sweep(); add one returning product(sweep(...))")
    result = get_sweep()
    if not isinstance(result, Sweep):
        raise SweepError(f"get_sweep() in {path} returned {type(result).__name__}, not a Sweep")
    if not result.points:
        raise SweepError(f"get_sweep() in {path} returned no points")
    return result


def sampling_points(path: str | None, reserved: Iterable[str] = ()) -> list[Point]:
    """The points of the sweep file at `path` ([{}] without one) for scoring one trained run
    (`experiments.sampler_table --sweep`): `SweepError` for a key outside `sampling.*` (that
    would be another model: sweep it with experiments.sweep) or in `reserved` (set otherwise)."""
    if not path:
        return [{}]
    points = list(load_sweep(path))
    reserved = set(reserved)
    for key in dict.fromkeys(k for point in points for k in point):
        if not key.startswith("sampling.") or key in reserved:
            raise SweepError(
                f"{path} sweeps {key!r}; a sweep of one trained run takes sampling.* keys, "
                f"except {sorted(reserved)}; sweep training keys with experiments.sweep"
            )
    return points


# ---------------------------------------------------------------------------------------------
# Names.


def format_value(value: Any) -> str:
    """How a value is written after `--config.key=` (and parsed back by ml_collections)."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        return repr(value)
    return str(value)  # ints, floats (shortest repr), bools


def point_names(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """Directory names of the points, e.g. `prediction=v,schedule=cosine`.

    Keys are shortened to their shortest dotted suffix that is unique among the sweep's keys
    (`training.batch_size` and `sampling.batch_size` stay apart); values are written as on the
    command line with tuples joined by '-'; characters outside `[A-Za-z0-9._+=,-]` become '_'.
    Very long names keep a prefix plus a hash of the whole. Raises `SweepError` when two points
    get the same name (e.g. a duplicated point in `chain`).
    """
    keys = list(dict.fromkeys(k for p in points for k in p))
    short = _short_keys(keys)
    names = []
    for point in points:
        raw = ",".join(f"{short[k]}={_name_value(v)}" for k, v in point.items()) or "base"
        name = re.sub(r"[^A-Za-z0-9._+=,-]", "_", raw).lstrip(".-") or "_"
        if len(name) > _MAX_NAME_LENGTH:
            digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
            name = f"{name[: _MAX_NAME_LENGTH - 9]}~{digest}"
        names.append(name)
    for name in names:
        if names.count(name) > 1:
            same = [dict(p) for p, n in zip(points, names, strict=True) if n == name]
            raise SweepError(f"points {same} share the directory name {name!r}; make them differ")
    return names


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    short = {}
    for key in keys:
        parts = key.split(".")
        for depth in range(1, len(parts) + 1):
            suffix = ".".join(parts[-depth:])
            if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        short[key] = suffix
    return short


def _name_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "-".join(_name_value(v) for v in value) or "none"
    return format_value(value)


# ---------------------------------------------------------------------------------------------
# Validation against a config.


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All leaf keys of `config` as dotted paths, e.g. 'training.num_train_steps'."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, path + "."))
        else:
            keys.append(path)
    return keys


def check_key(config: ml_collections.ConfigDict, key: str, *, where: str = "the sweep") -> None:
    """Raise `SweepError` unless `key` is a leaf of `config`, naming the closest keys."""
    keys = flat_keys(config)
    if key in keys:
        return
    last = key.split(".")[-1]
    close = [k for k in keys if k.split(".")[-1] == last]
    close += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.6) if k not in close]
    if close:
        hint = f"close keys: {', '.join(close)}"
    else:
        group = key.rsplit(".", 1)[0] + "." if "." in key else ""
        known = [k for k in keys if k.startswith(group)] or keys
        hint = f"keys there: {', '.join(known)}"
    raise SweepError(f"unknown config key {key!r} in {where}; {hint}")


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """A copy of `config` with the dotted `overrides` set; `SweepError` for unknown keys or values
    of the wrong type (what ml_collections would refuse when parsing `--config.key=value`)."""
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        check_key(config, key)
        *groups, leaf = key.split(".")
        node = config
        for group in groups:
            node = node[group]
        try:
            node[leaf] = value
        except (TypeError, ValueError) as error:
            raise SweepError(
                f"{key}={value!r} does not fit the config ({error}); use a value of type "
                f"{type(node[leaf]).__name__}"
            ) from None
    return config


def validate_points(
    config: ml_collections.ConfigDict,
    points: Sequence[Mapping[str, Any]],
    base_overrides: Iterable[str] = (),
) -> list[ml_collections.ConfigDict]:
    """The resolved config of every point (`config` with its overrides), before anything runs.

    Raises `SweepError` for an unknown key (listing close ones), a value of the wrong type, or a
    key given both in the sweep and as a command-line override (`base_overrides`).
    """
    swept = set(itertools.chain.from_iterable(points))
    for key in base_overrides:
        if key in swept:
            raise SweepError(
                f"--config.{key} is also swept by the sweep file; drop the override or the sweep"
            )
    return [apply_overrides(config, point) for point in points]


# ---------------------------------------------------------------------------------------------
# Results.


def write_sweep_file(sweep_dir: str, names: Sequence[str], points: Sequence[Point]) -> None:
    """Record the points as `<sweep_dir>/sweep.json` ({"points": [{"name", "overrides"}]})."""
    records = [{"name": n, "overrides": dict(p)} for n, p in zip(names, points, strict=True)]
    workdir_lib.atomic_write_text(
        os.path.join(sweep_dir, "sweep.json"), json.dumps({"points": records}, indent=2)
    )


def read_sweep_file(sweep_dir: str) -> tuple[list[str], list[Point]]:
    """(names, points) from `<sweep_dir>/sweep.json`."""
    path = os.path.join(sweep_dir, "sweep.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist; run python -m experiments.sweep --workdir={sweep_dir} first"
        )
    with open(path) as f:
        records = json.load(f)["points"]
    return [r["name"] for r in records], [_as_config_value_dict(r["overrides"]) for r in records]


def _as_config_value_dict(point: Mapping[str, Any]) -> Point:
    return {k: _as_config_value(v) for k, v in point.items()}


def _scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (possibly nested) metrics dict, nested keys joined by '.'."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(_scalar_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def collect_results(
    sweep_dir: str,
    names: Sequence[str],
    points: Sequence[Mapping[str, Any]],
    *,
    metrics: Sequence[str] | None = None,
    failed: Iterable[str] = (),
) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the results table: one row per point, read from its workdir.

    Columns: `point`, the swept keys, `status` ('failed' for names in `failed`, else 'done' when
    the latest checkpoint reaches the run's saved `training.num_train_steps`, else
    'incomplete'), `step` (latest checkpoint), then the metrics. `metrics=None` gives the final
    training `loss` and every eval metric found, as `<eval name>/<metric>`; a list picks names
    from both sources (e.g. `["loss", "grad_norm", "fd"]`). Missing values are None.
    """
    failed = set(failed)
    train_keys = list(DEFAULT_TRAIN_METRICS if metrics is None else metrics)
    keys = list(dict.fromkeys(k for p in points for k in p))
    eval_columns: set[str] = set()
    rows = []
    for name, point in zip(names, points, strict=True):
        workdir = os.path.join(sweep_dir, name)
        row: dict[str, Any] = {POINT_COLUMN: name, **{k: point.get(k) for k in keys}}
        step = workdir_lib.latest_step(workdir)
        target = workdir_lib.saved_num_train_steps(workdir)
        row[STATUS_COLUMN] = (
            "failed"
            if name in failed
            else "done"
            if target is not None and step >= target
            else "incomplete"
        )
        row[STEP_COLUMN] = step or None
        row.update(workdir_lib.final_metrics(workdir, train_keys))
        for result in workdir_lib.read_eval_results(workdir):
            for metric, value in _scalar_metrics(result["metrics"]).items():
                if metrics is None or metric in metrics:
                    column = f"{result['name']}/{metric}"
                    row[column] = value
                    eval_columns.add(column)
        rows.append(row)
    # A requested name found only in eval results gets no empty training column; one found
    # nowhere keeps its (empty) column, so a misspelt metric shows up in the table.
    train_columns = [
        k
        for k in train_keys
        if any(k in row for row in rows) or not any(c.endswith("/" + k) for c in eval_columns)
    ]
    columns = [POINT_COLUMN, *keys, STATUS_COLUMN, STEP_COLUMN, *train_columns]
    columns += sorted(eval_columns)
    return columns, [{c: row.get(c) for c in columns} for row in rows]


def write_results(
    sweep_dir: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> None:
    """Write `<sweep_dir>/results.csv` (full precision) and `results.md` (4 significant digits)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_value(row.get(c)) for c in columns})
    workdir_lib.atomic_write_text(os.path.join(sweep_dir, "results.csv"), buffer.getvalue())
    workdir_lib.atomic_write_text(
        os.path.join(sweep_dir, "results.md"), markdown_table(columns, rows)
    )


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of `rows`; floats to 4 significant digits, missing values empty."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return _csv_value(value).replace("|", "\\|")

    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(" ---: " if is_numeric_column(rows, c) else " --- " for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def is_numeric_column(rows: Sequence[Mapping[str, Any]], column: str) -> bool:
    """Whether every present value of `column` is an int or float (not a bool)."""
    values = [r.get(column) for r in rows if r.get(column) is not None]
    return bool(values) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    )


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return format_value(value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# TensorBoard HParams.

HPARAMS_DIR = "hparams"  # <point workdir>/hparams/: the point's HParams session
_HPARAMS_PLUGIN = "hparams"
_SESSION_START_TAG = "_hparams_/session_start_info"
_SESSION_END_TAG = "_hparams_/session_end_info"
_NOT_METRICS = (POINT_COLUMN, STATUS_COLUMN, STEP_COLUMN)


def write_hparams(sweep_dir: str, point: Mapping[str, Any], row: Mapping[str, Any]) -> None:
    """Write the point's row of the results table as a TensorBoard HParams session.

    `<sweep_dir>/<point name>/hparams/` gets one event file (replacing an earlier one): the
    swept keys and values (`SessionStartInfo`, group name = point name), every numeric metric
    of the row as a scalar at the point's latest step (tags as the table's columns: `loss`,
    `<eval name>/fd`, ...) and the status (`SessionEndInfo`: done -> success, failed ->
    failure, incomplete -> unknown). `tensorboard --logdir <sweep_dir>` then shows one HParams
    table with a row per point; TensorBoard infers the columns from the sessions, so points
    written at different times need no shared experiment file. Nothing needs TensorFlow: the
    protobufs are tensorboardX's copies of TensorBoard's. Does nothing when the point has no
    workdir (e.g. it failed before creating one).
    """
    from tensorboardX import FileWriter
    from tensorboardX.proto import api_pb2, plugin_hparams_pb2, summary_pb2

    name = str(row[POINT_COLUMN])
    workdir = os.path.join(sweep_dir, name)
    if not os.path.isdir(workdir):
        return
    start = plugin_hparams_pb2.SessionStartInfo(group_name=name)
    for key, value in point.items():
        hparam = start.hparams[key]
        if isinstance(value, bool):
            hparam.bool_value = value
        elif isinstance(value, int | float):
            hparam.number_value = float(value)
        else:
            hparam.string_value = format_value(value)
    status = {"done": "STATUS_SUCCESS", "failed": "STATUS_FAILURE"}.get(
        str(row[STATUS_COLUMN]), "STATUS_UNKNOWN"
    )
    end = plugin_hparams_pb2.SessionEndInfo(status=api_pb2.Status.Value(status))

    def plugin_summary(tag: str, data: plugin_hparams_pb2.HParamsPluginData) -> Any:
        content = data.SerializeToString()
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(
                plugin_name=_HPARAMS_PLUGIN, content=content
            )
        )
        return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=metadata)])

    step = int(row.get(STEP_COLUMN) or 0)
    logdir = os.path.join(workdir, HPARAMS_DIR)
    earlier = set(os.listdir(logdir)) if os.path.isdir(logdir) else set()
    # A unique suffix: a rewrite within the same second must not reuse the file name.
    writer = FileWriter(logdir, filename_suffix=f".{time.time_ns()}.{os.getpid()}")
    try:
        writer.add_summary(
            plugin_summary(_SESSION_START_TAG, plugin_hparams_pb2.HParamsPluginData(
                session_start_info=start)),
            step,
        )  # fmt: skip
        for column, value in row.items():
            if column in _NOT_METRICS or column in point:
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                scalar = summary_pb2.Summary.Value(tag=column, simple_value=float(value))
                writer.add_summary(summary_pb2.Summary(value=[scalar]), step)
        writer.add_summary(
            plugin_summary(_SESSION_END_TAG, plugin_hparams_pb2.HParamsPluginData(
                session_end_info=end)),
            step,
        )  # fmt: skip
    finally:
        writer.close()
    for old in earlier:
        if old.startswith("events.out.tfevents."):
            os.remove(os.path.join(logdir, old))
