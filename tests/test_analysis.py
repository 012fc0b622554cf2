"""The notebook API on a tiny trained digits run: loading, metrics, sampling, plots, sweeps."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the 'notebook' extra is not installed")

from matplotlib.figure import Figure

from diffusion_jax import analysis
from diffusion_jax.checkpointing import NoCheckpointError
from diffusion_jax.runner import sweeps
from tests.test_recompilation import compile_log


@pytest.fixture(scope="module")
def workdir(shared_tiny_run) -> str:
    """The session's tiny run (checkpoints 3 and 6, losses logged at 2, 4, 6); read only."""
    return shared_tiny_run.workdir


@pytest.fixture(scope="module")
def run(workdir):
    return analysis.load_run(workdir)


def test_load_run_reads_the_latest_or_a_chosen_checkpoint(workdir, run):
    assert analysis.list_checkpoints(workdir) == [3, 6]
    assert run.step == 6 and run.config.training.num_train_steps == 6
    assert analysis.load_run(workdir, step=3).step == 3


def test_load_run_of_an_untrained_workdir_names_the_fix(tmp_path):
    with pytest.raises(NoCheckpointError, match="train first"):
        analysis.load_run(tmp_path)
    assert analysis.list_checkpoints(tmp_path) == []


def test_read_metrics_gives_numpy_columns_per_logged_step(workdir):
    columns = analysis.read_metrics(workdir)
    np.testing.assert_array_equal(columns["step"], [2, 4, 6])
    assert columns["loss"].dtype == np.float64 and np.all(np.isfinite(columns["loss"]))
    assert {"grad_norm", "steps_per_sec"} <= set(columns)
    picked = analysis.read_metrics(workdir, ["loss", "no_such_metric"])
    assert set(picked) == {"step", "loss", "no_such_metric"}
    assert np.all(np.isnan(picked["no_such_metric"]))


def test_sample_is_deterministic_per_seed(run):
    a = analysis.sample(run, 4, sampler="ddim", num_steps=5, seed=1)
    b = analysis.sample(run, 4, sampler="ddim", num_steps=5, seed=1)
    c = analysis.sample(run, 4, sampler="ddim", num_steps=5, seed=2)
    assert a.shape == (4, 8, 8, 1) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_compiles_once_per_option_set(workdir):
    run = analysis.load_run(workdir)  # a fresh Run: an empty sampler cache
    with compile_log() as compiled:
        first = analysis.sample(run, 3, sampler="ddim", num_steps=3, seed=0)
        after_first = len(compiled)
        again = analysis.sample(run, 3, sampler="ddim", num_steps=3, seed=5)  # new seed only
        after_again = len(compiled)
        analysis.sample(run, 3, sampler="ddim", num_steps=4, seed=0)  # a new option set
        after_new_options = len(compiled)
        same = analysis.sample(run, 3, sampler="ddim", num_steps=3, seed=0)  # back to the first
    assert after_first >= 1 and any("generate" in name for name in compiled), compiled
    assert after_again == after_first, compiled[after_first:]
    assert after_new_options > after_again
    assert len(compiled) == after_new_options, compiled[after_new_options:]
    np.testing.assert_array_equal(first, same)
    assert not np.array_equal(first, again)
    assert len(run._samplers) == 2


def test_sample_refuses_labels_for_an_unconditional_run(run):
    with pytest.raises(ValueError, match="not class-conditional; drop labels"):
        analysis.sample(run, 2, labels=3)


def test_show_grid_returns_a_figure_for_float_and_uint8_images():
    x = np.linspace(-1, 1, 6 * 8 * 8).reshape(6, 8, 8, 1).astype(np.float32)
    figure = analysis.show_grid(x, title="six", ncols=3)
    assert isinstance(figure, Figure) and figure.axes[0].get_title() == "six"
    shown = figure.axes[0].images[0].get_array()
    assert shown.shape == (2 * 9 + 1, 3 * 9 + 1)  # 2 rows x 3 columns with 1-pixel padding
    uint8 = analysis.show_grid(np.zeros((4, 8, 8, 3), np.uint8))
    assert uint8.axes[0].images[0].get_array().shape == (19, 19, 3)
    assert analysis.grid_image(x, ncols=3, scale=2).size == (2 * 28, 2 * 19)


def test_plot_metrics_draws_one_panel_per_key_and_one_curve_per_run(workdir, run):
    figure = analysis.plot_metrics({"a": workdir, "b": run}, keys=("loss", "grad_norm"))
    assert isinstance(figure, Figure) and len(figure.axes) == 2
    loss_panel = figure.axes[0]
    assert loss_panel.get_ylabel() == "loss" and len(loss_panel.lines) == 2
    np.testing.assert_array_equal(loss_panel.lines[0].get_xdata(), [2, 4, 6])


def test_load_eval_results_reads_the_eval_modes_json(tmp_path):
    (tmp_path / "eval").mkdir()
    record = {"name": "ddim50_seed0", "step": 6, "metrics": {"fd": 3.5}}
    (tmp_path / "eval" / "ddim50_seed0.json").write_text(json.dumps(record))
    (tmp_path / "eval" / "partial.json").write_text('{"name": ')  # being written
    assert analysis.load_eval_results(tmp_path) == [record]


def test_compare_sweep_reads_the_table_and_plots_curves_and_a_metric(workdir, tmp_path):
    points = list(sweeps.sweep("diffusion.prediction", ["eps", "v"]))
    names = sweeps.point_names(points)
    for name in names:  # the same run twice stands in for two trained points
        os.symlink(workdir, tmp_path / name)
    sweeps.write_sweep_file(str(tmp_path), names, points)

    before_table = analysis.compare_sweep(tmp_path)  # no results.csv yet: read the workdirs
    sweeps.write_results(str(tmp_path), before_table.columns, before_table.rows)
    comparison = analysis.compare_sweep(tmp_path)

    assert comparison.column("point") == names
    assert comparison.column("status") == ["done", "done"]
    assert comparison.column("step") == [6, 6]
    assert comparison.column("loss") == before_table.column("loss")
    curves, bars = comparison.figure.axes
    assert len(curves.lines) == 2 and bars.get_xlabel() == "loss"
    assert "| prediction=v | v | done | 6 |" in comparison._repr_markdown_()
    with pytest.raises(ValueError, match="not a column"):
        analysis.compare_sweep(tmp_path, metric="fid")
