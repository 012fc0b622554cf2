"""Notebook helpers: load a run, read its metrics and eval results, sample, show grids, plot
training curves and compare the points of a sweep.

    from diffusion_jax import analysis
    run = analysis.load_run("workdirs/digits")
    analysis.plot_metrics("workdirs/digits", keys=("loss", "grad_norm"))
    x = analysis.sample(run, 64, sampler="ddim", num_steps=50, seed=0)   # float32 (64, H, W, C)
    analysis.show_grid(x, title="DDIM 50")
    table = analysis.compare_sweep("workdirs/sweeps/prediction_x_schedule")  # rows + .figure

Plotting needs matplotlib (the 'notebook' extra: `pip install -e '.[notebook]'`); it is imported
only inside the plotting functions, so the rest works without it. Figures are created without
pyplot: nothing is shown twice or kept alive by a global figure registry, and Jupyter displays
a returned `Figure` once.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np
from PIL import Image

from diffusion_jax import images
from diffusion_jax.runner import sweeps
from diffusion_jax.runner import workdir as workdir_lib
from diffusion_jax.runner.loading import Run
from diffusion_jax.runner.loading import load_run as _load_run

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RunLike = str | os.PathLike[str] | Run


def load_run(
    workdir: str | os.PathLike[str],
    step: int | None = None,
    *,
    config: ml_collections.ConfigDict | None = None,
    params: str = "ema",
) -> Run:
    """The run in `workdir` at checkpoint `step` (default: the latest readable one).

    See `diffusion_jax.runner.loading.load_run`; `run.config`, `run.step`, `run.params` (EMA, or
    with params='posthoc_ema:<sigma_rel>' a post-hoc EMA reconstruction) and `run.schedule`
    describe it.
    """
    with _without_read_only_notices():
        return _load_run(os.fspath(workdir), step=step, config=config, params=params)


class _ReadOnlyNotices(logging.Filter):
    """Orbax warns that a read-only checkpoint manager is read-only; in a notebook that is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "/orbax/" not in record.pathname or "read only" not in record.getMessage().replace(
            "_", " "
        )


@contextlib.contextmanager
def _without_read_only_notices() -> Iterator[None]:
    absl_logger, notices = logging.getLogger("absl"), _ReadOnlyNotices()
    absl_logger.addFilter(notices)
    try:
        yield
    finally:
        absl_logger.removeFilter(notices)


def list_checkpoints(workdir: str | os.PathLike[str]) -> list[int]:
    """Steps of the finished checkpoints in `workdir`, ascending (empty when none)."""
    return workdir_lib.finished_steps(os.fspath(workdir))


def read_metrics(
    workdir: str | os.PathLike[str], keys: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """`<workdir>/metrics.jsonl` as columns: {"step": int64 (N,), key: float64 (N,), ...}.

    One entry per logged step, in order. `keys` picks columns (default: every key seen); a record
    without a key gets NaN there. Damaged lines (e.g. one cut short by a kill) are skipped.
    """
    records = workdir_lib.read_metrics(os.fspath(workdir))
    return workdir_lib.metric_columns(records, None if keys is None else list(keys))


def load_eval_results(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The eval mode's results in `<workdir>/eval/*.json`, sorted by name: each
    `{"name": str, "step": int, "metrics": {"fd": float, ...}, ...}` as written."""
    return workdir_lib.read_eval_results(os.fspath(workdir))


def sample(
    run: Run,
    num_samples: int,
    *,
    sampler: str | None = None,
    num_steps: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    labels: int | Sequence[int] | np.ndarray | None = None,
    guide: Run | str | None = None,
    **sampler_kwargs: Any,
) -> np.ndarray:
    """float32 (num_samples, H, W, C) samples in [-1, 1] from the run's EMA parameters.

    Unset options come from the run's `config.sampling`; `sampler_kwargs` go to
    `samplers.sample` (eta, temperature, timestep_spacing, ...). Sample i depends only on
    (seed, i). `labels` (an int for all samples, or one per sample) need a class-conditional
    run; such a run without `labels` cycles through the classes 0, 1, ... `guidance_scale`
    guides by the unconditional model (classifier-free, class-conditional runs) or, with
    `guide` (a loaded `Run` or a source such as 'step:1000'; `Run.sample`), by that weaker
    model (autoguidance, any run).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}; ask for at least one sample")
    if sampler is not None:
        sampler_kwargs["sampler"] = sampler
    if num_steps is not None:
        sampler_kwargs["num_steps"] = num_steps
    if guidance_scale is not None:
        sampler_kwargs["guidance_scale"] = guidance_scale
    num_classes = run.num_classes
    if num_classes is None:
        if labels is not None:
            raise ValueError(f"{run.workdir} is not class-conditional; drop labels")
        if guide is None and guidance_scale is not None and guidance_scale != 1.0:
            raise ValueError(
                f"{run.workdir} is not class-conditional: guidance_scale needs a guide "
                "(autoguidance, e.g. guide='step:1000'), or drop it"
            )
        label_array = None
    elif labels is None:
        label_array = np.arange(num_samples, dtype=np.int32) % num_classes
    else:
        label_array = np.broadcast_to(np.asarray(labels, np.int32), (num_samples,)).copy()
        if label_array.min() < 0 or label_array.max() >= num_classes:
            raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels}")
    return run.sample(num_samples, seed=seed, labels=label_array, guide=guide, **sampler_kwargs)


def _as_uint8(x: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) from uint8 or [-1, 1] float images (also (N, H, W))."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C) or (N, H, W), got shape {x.shape}")
    return x if x.dtype == np.uint8 else images.to_uint8(x)


def grid_image(x: np.ndarray, *, ncols: int | None = None, scale: int = 1) -> Image.Image:
    """The images tiled into one PIL image (no matplotlib needed), enlarged `scale` times.

    x: uint8 or float in [-1, 1], (N, H, W, C) with C in {1, 3}, or (N, H, W).
    """
    grid = images.make_grid(_as_uint8(x), ncols=ncols)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)


def show_grid(
    x: np.ndarray,
    *,
    ncols: int | None = None,
    title: str | None = None,
    size: float = 4.0,
    ax: Axes | None = None,
) -> Figure:
    """A matplotlib Figure of the images tiled in a grid (grey for one channel).

    x: uint8 or float in [-1, 1], (N, H, W, C) or (N, H, W). Draws into `ax` when given (and
    returns its figure), else into a new `size`-inch-wide figure.
    """
    grid = images.make_grid(_as_uint8(x), ncols=ncols)
    if ax is None:
        figure = _new_figure(size, size * grid.shape[0] / grid.shape[1])
        ax = figure.add_axes((0.0, 0.0, 1.0, 0.92 if title else 1.0))
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return _figure_of(ax)


def plot_metrics(
    runs: RunLike | Sequence[RunLike] | Mapping[str, RunLike],
    keys: Sequence[str] = ("loss",),
    *,
    smoothing: int = 1,
    log_y: bool = False,
    size: tuple[float, float] = (5.0, 3.5),
) -> Figure:
    """One panel per metric key, one curve per run, against the training step.

    runs: a workdir, a `Run`, a list of them (labelled by directory name) or a mapping
    label -> workdir/Run. `smoothing` > 1 averages each curve over that many logged values.
    """
    if isinstance(runs, Mapping):
        labelled = [(str(k), _workdir_of(v)) for k, v in runs.items()]
    else:
        items = [runs] if isinstance(runs, str | os.PathLike | Run) else list(runs)
        labelled = [(os.path.basename(os.path.normpath(w)), w) for w in map(_workdir_of, items)]
    if not labelled:
        raise ValueError("plot_metrics got no runs; pass a workdir, a Run or a list of them")
    figure = _new_figure(size[0] * len(keys), size[1])
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        for label, workdir in labelled:
            columns = read_metrics(workdir, [key])
            step, value = columns["step"], columns[key]
            keep = np.isfinite(value)
            step, value = step[keep], _moving_average(value[keep], smoothing)
            ax.plot(step[len(step) - len(value) :], value, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if len(labelled) > 1:
        axes[-1].legend(fontsize="small")
    figure.tight_layout()
    return figure


def _moving_average(value: np.ndarray, window: int) -> np.ndarray:
    """Means over `window` consecutive values, (N,) -> (N - window + 1,) (unchanged if <= 1)."""
    if window <= 1 or len(value) < window:
        return value
    return np.convolve(value, np.ones(window) / window, mode="valid")


@dataclasses.dataclass
class SweepComparison:
    """The results table of a sweep and a figure of it; Jupyter shows the table as Markdown."""

    columns: list[str]
    rows: list[dict[str, Any]]
    figure: Figure

    def column(self, name: str) -> list[Any]:
        """One column's values, in row order."""
        return [row.get(name) for row in self.rows]

    def _repr_markdown_(self) -> str:
        return sweeps.markdown_table(self.columns, self.rows)


def compare_sweep(
    sweep_dir: str | os.PathLike[str],
    *,
    metric: str | None = None,
    curve_key: str = "loss",
    smoothing: int = 1,
) -> SweepComparison:
    """The rows of `<sweep_dir>/results.csv` (or, before the sweep wrote one, of its points'
    workdirs) and a figure: each point's `curve_key` training curve, and a bar per point of
    `metric` (default: the first eval metric, else the final loss)."""
    sweep_dir = os.fspath(sweep_dir)
    columns, rows = _sweep_table(sweep_dir)
    numeric = [c for c in columns if c != sweeps.STEP_COLUMN and sweeps.is_numeric_column(rows, c)]
    if metric is None:
        metric = next((c for c in numeric if "/" in c), "loss" if "loss" in numeric else None)
    elif metric not in columns:
        raise ValueError(f"metric {metric!r} is not a column of the sweep table: {columns}")
    figure = _new_figure(11.0, max(3.5, 1.0 + 0.3 * len(rows)))  # room for a bar per point
    curves, bars = figure.subplots(1, 2)
    for row in rows:
        workdir = os.path.join(sweep_dir, str(row[sweeps.POINT_COLUMN]))
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            values = read_metrics(workdir, [curve_key])
            keep = np.isfinite(values[curve_key])
            value = _moving_average(values[curve_key][keep], smoothing)
            step = values["step"][keep]
            curves.plot(step[len(step) - len(value) :], value, label=row[sweeps.POINT_COLUMN])
    curves.set_xlabel("step")
    curves.set_ylabel(curve_key)
    curves.grid(alpha=0.3)
    if curves.lines:
        curves.legend(fontsize="small")
    if metric is not None:
        labels = [str(row[sweeps.POINT_COLUMN]) for row in rows]
        heights = [math.nan if row.get(metric) is None else row[metric] for row in rows]
        bars.bar_label(bars.barh(labels, heights), fmt="%.4g", fontsize="small")
        bars.invert_yaxis()  # first point on top, as in the table
        bars.set_xlabel(metric)
        bars.tick_params(axis="y", labelsize="small")
    figure.tight_layout()
    return SweepComparison(columns=columns, rows=rows, figure=figure)


def _sweep_table(sweep_dir: str) -> tuple[list[str], list[dict[str, Any]]]:
    path = os.path.join(sweep_dir, "results.csv")
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = [{k: _parse_cell(v) for k, v in row.items()} for row in reader]
        return columns, rows
    if os.path.exists(os.path.join(sweep_dir, "sweep.json")):
        names, points = sweeps.read_sweep_file(sweep_dir)
        return sweeps.collect_results(sweep_dir, names, points)
    raise FileNotFoundError(
        f"{sweep_dir} has no results.csv or sweep.json; run python -m experiments.sweep "
        f"--workdir={sweep_dir} ... first"
    )


def _parse_cell(text: str | None) -> Any:
    """A CSV cell back to None / int / float, else the string as written."""
    if text is None or text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _workdir_of(run: RunLike) -> str:
    return run.workdir if isinstance(run, Run) else os.fspath(run)


def _new_figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib: pip install -e '.[notebook]' (or pip install matplotlib)"
        ) from None
    return Figure(figsize=(width, height))


def _figure_of(ax: Axes) -> Figure:
    figure = ax.get_figure()
    assert figure is not None  # an Axes always belongs to a figure
    return figure  # type: ignore[return-value]
