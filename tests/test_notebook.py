"""The example notebook runs top to bottom on the session's tiny run, so it cannot rot unnoticed."""

from __future__ import annotations

import os

import pytest

nbclient = pytest.importorskip("nbclient", reason="the 'notebook' extra is not installed")
nbformat = pytest.importorskip("nbformat", reason="the 'notebook' extra is not installed")
pytest.importorskip("ipykernel", reason="the 'notebook' extra is not installed")
pytest.importorskip("matplotlib", reason="the 'notebook' extra is not installed")

from diffusion_jax.runner import sweeps  # noqa: E402
from tests.conftest import COMPILATION_CACHE_ENV  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "digits_analysis.ipynb")


@pytest.mark.slow  # a Jupyter kernel
def test_digits_notebook_runs_without_errors_and_shows_images(
    shared_tiny_run, tmp_path, monkeypatch
):
    workdir = shared_tiny_run.workdir  # the notebook only reads it
    # A sweep directory whose two points are the same run, for the comparison cells.
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    points = list(sweeps.sweep("diffusion.prediction", ["eps", "v"]))
    names = sweeps.point_names(points)
    for name in names:
        os.symlink(workdir, sweep_dir / name)
    sweeps.write_sweep_file(str(sweep_dir), names, points)
    sweeps.write_results(str(sweep_dir), *sweeps.collect_results(str(sweep_dir), names, points))
    # The kernel inherits this environment: the run to analyse and the compiled-program cache.
    monkeypatch.setenv("DIGITS_WORKDIR", str(workdir))
    monkeypatch.setenv("DIGITS_SWEEP_DIR", str(sweep_dir))
    for key, value in COMPILATION_CACHE_ENV.items():
        monkeypatch.setenv(key, value)
    # As pytest's pythonpath: the package imports even where it is not pip-installed.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    )

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any error

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 4  # loss curves, two sample grids, the sweep comparison
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert any("| prediction=v | v | done | 6 |" in table for table in markdown)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{workdir}: step 6, checkpoints [3, 6]" in text
