"""Sweeps: expanding and naming points, validating keys, results tables, and the sweep runner
end to end on a tiny 2-point digits sweep (train, skip finished points, resume, failures)."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

from configs import digits
from diffusion_jax.runner import sweep_backends, sweeps
from diffusion_jax.runner.sweeps import SweepError, chain, product, sweep, zip_
from tests.conftest import COMPILATION_CACHE_ENV, TINY_OVERRIDES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- Describing and naming points -------------------------------------------------------------


def test_product_gives_every_combination_with_the_last_factor_fastest():
    points = list(
        product(
            sweep("diffusion.prediction", ["eps", "v"]), sweep("diffusion.schedule", ["a", "b"])
        )
    )
    assert points == [
        {"diffusion.prediction": "eps", "diffusion.schedule": "a"},
        {"diffusion.prediction": "eps", "diffusion.schedule": "b"},
        {"diffusion.prediction": "v", "diffusion.schedule": "a"},
        {"diffusion.prediction": "v", "diffusion.schedule": "b"},
    ]


def test_zip_pairs_values_in_order_and_composes_with_product_and_chain():
    lr = zip_(sweep("training.learning_rate", [1e-3, 3e-4]), sweep("training.warmup_steps", [1, 2]))
    assert list(lr) == [
        {"training.learning_rate": 1e-3, "training.warmup_steps": 1},
        {"training.learning_rate": 3e-4, "training.warmup_steps": 2},
    ]
    grid = product(sweep("seed", [0, 1, 2]), lr)
    assert len(grid) == 6
    assert list(grid)[1] == {"seed": 0, "training.learning_rate": 3e-4, "training.warmup_steps": 2}
    assert len(chain(grid, sweep("seed", [7]))) == 7


def test_zip_of_unequal_lengths_is_refused_naming_the_lengths():
    with pytest.raises(SweepError, match=r"equal length, got 2 \(seed\), 3 \(model.ch\)"):
        zip_(sweep("seed", [0, 1]), sweep("model.ch", [8, 16, 32]))


def test_a_key_swept_twice_is_refused():
    with pytest.raises(SweepError, match="key 'seed' twice"):
        product(sweep("seed", [0, 1]), sweep("seed", [2]))


def test_point_names_use_the_shortest_unique_key_suffix_and_safe_characters():
    points = list(
        product(
            sweep("training.batch_size", [16]),
            sweep("sampling.batch_size", [4]),
            sweep("model.ch_mult", [[1, 2]]),  # lists become tuples, as configs hold them
            sweep("data.name", ["a b/c"]),
        )
    )
    assert points[0]["model.ch_mult"] == (1, 2)
    assert sweeps.point_names(points) == [
        "training.batch_size=16,sampling.batch_size=4,ch_mult=1-2,name=a_b_c"
    ]


def test_point_names_are_stable_per_point_and_duplicates_are_refused():
    a = sweeps.point_names(list(sweep("diffusion.schedule", ["linear", "cosine"])))
    assert a == ["schedule=linear", "schedule=cosine"]
    with pytest.raises(SweepError, match="share the directory name 'seed=1'"):
        sweeps.point_names(list(chain(sweep("seed", [1]), sweep("seed", [1]))))


def test_very_long_names_are_shortened_with_a_hash_and_stay_distinct():
    points = [{"sampling.name": "x" * 300 + str(i)} for i in range(2)]
    names = sweeps.point_names(points)
    assert all(len(n) <= 120 for n in names) and names[0] != names[1]


def test_unknown_sweep_key_error_lists_close_keys():
    config = digits.get_config()
    with pytest.raises(
        SweepError, match=r"unknown config key 'diffusion.predicton'.*diffusion\.prediction"
    ):
        sweeps.validate_points(config, [{"diffusion.predicton": "v"}])


def test_value_of_the_wrong_type_is_refused_before_running():
    with pytest.raises(SweepError, match=r"training\.num_train_steps='many' does not fit"):
        sweeps.validate_points(digits.get_config(), [{"training.num_train_steps": "many"}])


def test_validate_points_returns_each_resolved_config_without_changing_the_base():
    config = digits.get_config()
    resolved = sweeps.validate_points(config, list(sweep("diffusion.prediction", ["v", "x0"])))
    assert [c.diffusion.prediction for c in resolved] == ["v", "x0"]
    assert config.diffusion.prediction == "eps"


# --- Results tables ---------------------------------------------------------------------------


def _fake_point(root, name, *, steps, target, losses, evals=()):
    """A point workdir as training and the eval mode leave it (checkpoint dirs empty)."""
    workdir = root / name
    workdir.mkdir()
    for step in steps:
        (workdir / "checkpoints" / str(step)).mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"training": {"num_train_steps": target}}))
    lines = [json.dumps({"step": 2 * (i + 1), "loss": x}) for i, x in enumerate(losses)]
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if evals:
        (workdir / "eval").mkdir()
    for eval_name, metrics in evals:
        record = {"name": eval_name, "step": target, "metrics": metrics}
        (workdir / "eval" / f"{eval_name}.json").write_text(json.dumps(record))


def test_results_hold_overrides_status_final_loss_and_eval_metrics(tmp_path):
    points = list(sweep("diffusion.prediction", ["eps", "v", "x0"]))
    names = sweeps.point_names(points)
    _fake_point(
        tmp_path, names[0], steps=[3, 6], target=6, losses=[0.9, 0.5],
        evals=[("ddim50", {"fd": 1.5, "pr": {"precision": 0.75}})],
    )  # fmt: skip
    _fake_point(tmp_path, names[1], steps=[3], target=6, losses=[0.8])
    _fake_point(tmp_path, names[2], steps=[], target=6, losses=[])

    columns, rows = sweeps.collect_results(str(tmp_path), names, points, failed=[names[2]])
    sweeps.write_results(str(tmp_path), columns, rows)

    assert columns == [
        *("point", "diffusion.prediction", "status", "step", "loss"),
        *("ddim50/fd", "ddim50/pr.precision"),
    ]
    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table[0] == {
        "point": "prediction=eps", "diffusion.prediction": "eps", "status": "done", "step": "6",
        "loss": "0.5", "ddim50/fd": "1.5", "ddim50/pr.precision": "0.75",
    }  # fmt: skip
    assert [r["status"] for r in table] == ["done", "incomplete", "failed"]
    assert table[1]["ddim50/fd"] == "" and table[2]["loss"] == ""
    markdown = (tmp_path / "results.md").read_text().splitlines()
    assert markdown[0].startswith("| point | diffusion.prediction | status |")
    assert markdown[2] == "| prediction=eps | eps | done | 6 | 0.5 | 1.5 | 0.75 |"


def test_metrics_selection_takes_names_from_training_and_eval(tmp_path):
    points = [{"seed": 0}]
    _fake_point(tmp_path, "seed=0", steps=[6], target=6, losses=[0.5], evals=[("e", {"fd": 2.0})])
    columns, rows = sweeps.collect_results(str(tmp_path), ["seed=0"], points, metrics=["fd"])
    assert columns == ["point", "seed", "status", "step", "e/fd"]
    assert rows[0]["e/fd"] == 2.0


# --- The sweep runner -------------------------------------------------------------------------

_TWO_POINTS = """
from diffusion_jax.runner.sweeps import sweep
from diffusion_jax.runner import sweeps

def get_sweep():
    return sweep("diffusion.prediction", ["eps", "v"])
"""


def _write_sweep(tmp_path, body: str = _TWO_POINTS) -> str:
    path = tmp_path / "sweep_def.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def _run_sweep(sweep_file, workdir, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "experiments.sweep", "--config=configs/digits.py"]
    command += [f"--sweep={sweep_file}", f"--workdir={workdir}", *args]
    return subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, **COMPILATION_CACHE_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained_sweep(tmp_path_factory, digits_data_dir):
    """The tiny config swept over prediction eps, v; 6 steps each: (sweep file, dir, result)."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    sweep_file = _write_sweep(tmp_path)
    workdir = tmp_path / "runs"
    result = _run_sweep(
        sweep_file, workdir, f"--config.data.data_dir={digits_data_dir}", *TINY_OVERRIDES
    )
    return sweep_file, workdir, result


@pytest.mark.slow
def test_sweep_trains_every_point_in_its_own_workdir_and_writes_the_tables(trained_sweep):
    _, workdir, result = trained_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    for name, prediction in [("prediction=eps", "eps"), ("prediction=v", "v")]:
        assert sorted(os.listdir(workdir / name / "checkpoints")) == ["3", "6"]
        config = json.loads((workdir / name / "config.json").read_text())
        assert config["diffusion"]["prediction"] == prediction
        assert config["model"]["num_res_blocks"] == 1  # the command-line overrides reach it
    with open(workdir / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["point"], r["status"], r["step"]) for r in table] == [
        ("prediction=eps", "done", "6"),
        ("prediction=v", "done", "6"),
    ]
    assert all(float(r["loss"]) > 0 for r in table)
    assert "| prediction=v | v | done | 6 |" in (workdir / "results.md").read_text()
    names = [p["name"] for p in json.loads((workdir / "sweep.json").read_text())["points"]]
    assert names == ["prediction=eps", "prediction=v"]


@pytest.mark.slow
def test_rerun_skips_finished_points_and_resumes_an_interrupted_one(
    trained_sweep, tmp_path, digits_data_dir
):
    sweep_file, trained, _ = trained_sweep
    workdir = tmp_path / "runs"
    shutil.copytree(trained, workdir)
    # Point v as a run killed after its step-3 checkpoint; point eps finished and evaluated.
    shutil.rmtree(workdir / "prediction=v" / "checkpoints" / "6")
    finished = workdir / "prediction=eps" / "checkpoints" / "6"
    mtime = os.stat(finished).st_mtime_ns
    (workdir / "prediction=eps" / "eval").mkdir()
    eval_record = {"name": "dpm20", "step": 6, "metrics": {"fd": 12.5, "bits_per_dim": 3.25}}
    (workdir / "prediction=eps" / "eval" / "dpm20.json").write_text(json.dumps(eval_record))

    result = _run_sweep(
        sweep_file, workdir, f"--config.data.data_dir={digits_data_dir}", *TINY_OVERRIDES
    )

    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "[1/2] prediction=eps: skipped, finished (checkpoint at step 6)" in output
    assert "[2/2] prediction=v: training to step 6 (resuming from step 3)" in output
    assert "Resumed from step 3" in output and "Starting a new run" not in output
    assert os.stat(finished).st_mtime_ns == mtime
    assert sorted(os.listdir(workdir / "prediction=v" / "checkpoints")) == ["3", "6"]
    steps = [json.loads(line)["step"] for line in open(workdir / "prediction=v" / "metrics.jsonl")]
    assert steps == [2, 4, 6]
    with open(workdir / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["done", "done"]
    assert table[0]["dpm20/fd"] == "12.5" and table[0]["dpm20/bits_per_dim"] == "3.25"
    assert table[1]["dpm20/fd"] == ""


def _failing_sweep(tmp_path):
    """A 2-point sweep whose points fail within seconds, compiling nothing: files stand where
    their workdirs go. Returns (sweep file, sweep directory)."""
    sweep_file = _write_sweep(
        tmp_path,
        """
        from diffusion_jax.runner.sweeps import sweep

        def get_sweep():
            return sweep("seed", [0, 1])
        """,
    )
    workdir = tmp_path / "runs"
    workdir.mkdir()
    (workdir / "seed=0").write_text("")
    (workdir / "seed=1").write_text("")
    return sweep_file, workdir


@pytest.mark.slow
def test_a_failing_point_is_reported_the_sweep_goes_on_and_exits_nonzero(tmp_path):
    sweep_file, workdir = _failing_sweep(tmp_path)
    result = _run_sweep(sweep_file, workdir)

    assert result.returncode == 1
    assert "[1/2] seed=0: FAILED: training exited with status 1" in result.stdout
    assert "[2/2] seed=1: FAILED: training exited with status 1" in result.stdout
    assert "is not writable" in result.stderr  # the point's own error, passed through
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: 2 of 2 points failed"), result.stderr[-2000:]
    with open(workdir / "results.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["failed", "failed"]


def _results(workdir) -> list[dict[str, str]]:
    with open(workdir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_local_parallel_runs_points_at_once_and_ends_with_the_local_results(
    trained_sweep, tmp_path, digits_data_dir
):
    sweep_file, baseline, _ = trained_sweep
    workdir = tmp_path / "runs"
    result = _run_sweep(
        sweep_file, workdir, "--backend=local_parallel", "--max_parallel=2",
        f"--config.data.data_dir={digits_data_dir}", *TINY_OVERRIDES,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _results(workdir) == _results(baseline)
    for name in ("prediction=eps", "prediction=v"):
        assert f"{name}: on cpus " in result.stdout
        assert "Starting a new run" in (workdir / "logs" / f"{name}.log").read_text()


@pytest.mark.slow
def test_slurm_backend_through_submitits_local_executor_ends_with_the_local_results(
    trained_sweep, tmp_path, digits_data_dir
):
    pytest.importorskip("submitit")
    sweep_file, baseline, _ = trained_sweep
    workdir = tmp_path / "runs"
    shutil.copytree(baseline, workdir)
    shutil.rmtree(workdir / "prediction=v")  # resubmitting: eps is finished, v is new
    os.remove(workdir / "results.csv")
    result = _run_sweep(
        sweep_file, workdir, "--backend=slurm", "--slurm_executor=local", "--slurm_time=0:10:00",
        f"--config.data.data_dir={digits_data_dir}", *TINY_OVERRIDES,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[1/2] prediction=eps: skipped, finished" in result.stdout
    assert "[2/2] prediction=v: submitted as job" in result.stdout
    assert _results(workdir) == _results(baseline)
    assert list((workdir / "slurm").iterdir())  # submitit's job folders and logs


@pytest.mark.slow
def test_failing_points_in_local_parallel_are_reported_with_their_logs(tmp_path):
    sweep_file, workdir = _failing_sweep(tmp_path)
    result = _run_sweep(sweep_file, workdir, "--backend=local_parallel", "--max_parallel=2")

    assert result.returncode == 1
    for name in ("seed=0", "seed=1"):  # the first failure stopped nothing
        log = workdir / "logs" / f"{name}.log"
        assert f"{name}: FAILED: training exited with status 1 (log: {log})" in result.stdout
        assert "is not writable" in log.read_text()
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: 2 of 2 points failed (seed=0: training exited")
    assert [r["status"] for r in _results(workdir)] == ["failed", "failed"]


@pytest.mark.slow
def test_the_sweep_directory_opens_as_one_tensorboard_hparams_table(trained_sweep):
    _, workdir, result = trained_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    groups = _tensorboard_hparams_table(str(workdir))
    table = _results(workdir)
    assert [g["name"] for g in groups] == [r["point"] for r in table]
    for group, row in zip(groups, table, strict=True):
        assert group["hparams"] == {"diffusion.prediction": row["diffusion.prediction"]}
        assert group["metrics"] == {"loss": pytest.approx(float(row["loss"]), rel=1e-6)}
        assert group["step"] == 6 and group["status"] == "STATUS_SUCCESS"


def _tensorboard_hparams_table(logdir: str) -> list[dict]:
    """What TensorBoard's HParams dashboard lists for `logdir`: its backend, on the event files."""
    pytest.importorskip("tensorboard")
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, logdir)
    tb_context = base_plugin.TBContext(logdir=logdir, data_provider=provider)
    statuses = [api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE]
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=100, allowed_statuses=statuses
    )
    response = list_session_groups.Handler(
        context.RequestContext(), backend_context.Context(tb_context), "", request
    ).run()
    groups = []
    for group in sorted(response.session_groups, key=lambda g: g.name):
        (session,) = group.sessions
        groups.append({
            "name": group.name,
            "hparams": {k: v.string_value or v.number_value for k, v in group.hparams.items()},
            "metrics": {m.name.tag: m.value for m in group.metric_values},
            "step": {m.training_step for m in group.metric_values}.pop(),
            "status": api_pb2.Status.Name(session.status),
        })  # fmt: skip
    return sorted(groups, key=lambda g: ["prediction=eps", "prediction=v"].index(g["name"]))


def test_hparams_sessions_hold_the_swept_values_final_metrics_and_status(tmp_path):
    points = list(sweep("diffusion.prediction", ["eps", "v"]))
    names = sweeps.point_names(points)
    _fake_point(
        tmp_path, names[0], steps=[6], target=6, losses=[0.9, 0.5],
        evals=[("ddim50", {"fd": 1.5})],
    )  # fmt: skip
    _fake_point(tmp_path, names[1], steps=[3], target=6, losses=[0.8])
    _, rows = sweeps.collect_results(str(tmp_path), names, points, failed=[names[1]])
    for point, row in zip(points, rows, strict=True):
        sweeps.write_hparams(str(tmp_path), point, row)
    sweeps.write_hparams(str(tmp_path), points[0], rows[0])  # a rewrite replaces the file
    assert len(os.listdir(tmp_path / names[0] / "hparams")) == 1

    groups = _tensorboard_hparams_table(str(tmp_path))
    assert groups[0] == {
        "name": "prediction=eps", "hparams": {"diffusion.prediction": "eps"},
        "metrics": {"loss": 0.5, "ddim50/fd": 1.5}, "step": 6, "status": "STATUS_SUCCESS",
    }  # fmt: skip
    assert groups[1]["metrics"] == {"loss": pytest.approx(0.8)}
    assert groups[1]["step"] == 3 and groups[1]["status"] == "STATUS_FAILURE"


def test_device_slots_split_cpu_cores_and_gpus_into_disjoint_shares():
    slots = sweep_backends.device_slots(3, cpus=range(8), gpus=["0", "1", "2", "3", "4", "5", "6"])
    assert [s.cpus for s in slots] == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert [s.gpus for s in slots] == [("0", "1"), ("2", "3"), ("4", "5")]  # equal shares
    env = slots[1].env({"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["OMP_NUM_THREADS"] == "3"
    assert env["PATH"] == "/bin"
    assert slots[0].describe() == "cpus 0-2, CUDA_VISIBLE_DEVICES=0,1"
    cpu_only = sweep_backends.device_slots(2, cpus=[0, 1, 4, 5, 6], gpus=[])
    assert [s.describe() for s in cpu_only] == ["cpus 0-1,4", "cpus 5-6"]
    assert "CUDA_VISIBLE_DEVICES" not in cpu_only[0].env({})


def test_device_slots_refuse_more_points_than_cores_or_gpus():
    with pytest.raises(SweepError, match="--max_parallel=3 but this process may use 2 CPU"):
        sweep_backends.device_slots(3, cpus=[0, 1], gpus=[])
    with pytest.raises(SweepError, match=r"2 GPUs are visible \(0,1\); use --max_parallel=2"):
        sweep_backends.device_slots(4, cpus=range(8), gpus=["0", "1"])


def test_visible_gpus_follow_cuda_visible_devices():
    assert sweep_backends.visible_gpus({"CUDA_VISIBLE_DEVICES": "3, 5"}) == ["3", "5"]
    assert sweep_backends.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


@pytest.mark.parametrize(
    "text, minutes",
    [("90", 90), ("4:00:00", 240), ("30:30", 31), ("1-12", 2160), ("2-00:30:00", 2910)],
)
def test_slurm_time_limits_are_read_as_slurm_writes_them(text, minutes):
    assert sweep_backends.parse_slurm_time(text) == minutes


def test_a_slurm_time_that_is_no_time_is_refused():
    with pytest.raises(SweepError, match="--slurm_time='4h' is not a SLURM time"):
        sweep_backends.parse_slurm_time("4h")


def test_print_commands_prints_one_quoted_line_per_point_and_runs_nothing(tmp_path):
    sweep_file = _write_sweep(tmp_path)
    workdir = tmp_path / "runs"
    result = _run_sweep(
        sweep_file, workdir, "--print_commands", "--eval", "--config.model.ch_mult=(1, 2)"
    )

    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and not workdir.exists()
    train, evaluate = lines[1].split(" && ")
    assert shlex.split(train) == [
        "python", "-m", "experiments.main", "--config=configs/digits.py",
        f"--workdir={workdir}/prediction=v", "--config.model.ch_mult=(1, 2)",
        "--config.diffusion.prediction=v",
    ]  # fmt: skip
    assert shlex.split(evaluate) == [*shlex.split(train), "--mode=eval"]


@pytest.mark.parametrize(
    "sweep_body, overrides, message",
    [
        (
            'def get_sweep():\n    return sweep("diffusion.predicton", ["v"])',
            [],
            "unknown config key 'diffusion.predicton' in the sweep; close keys: "
            "diffusion.prediction",
        ),
        (
            'def get_sweep():\n    return zip_(sweep("seed", [0]), sweep("model.ch", [8, 16]))',
            [],
            "zip_ needs sweeps of equal length",
        ),
        (_TWO_POINTS, ["--config.diffusion.prediction=x0"], "also swept by the sweep file"),
        (_TWO_POINTS, ["--config.training.num_train_step=9"], "close keys: training.num_train_"),
        (
            'def get_sweep():\n    return sweep("sampling.num_steps", [5000])',
            [],
            "point num_steps=5000: ",
        ),
        (  # a swept name must stay a name: nothing may be written outside the point's workdir
            'def get_sweep():\n    return sweep("sampling.name", ["../../elsewhere"])',
            [],
            "sampling.name='../../elsewhere' must be a plain name",
        ),
        (
            'def get_sweep():\n    return sweep("eval.name", ["/tmp/elsewhere"])',
            ["--eval"],
            "eval.name='/tmp/elsewhere' must be a plain name",
        ),
        (
            _TWO_POINTS,
            ["--backend=local_parallel", f"--max_parallel={len(os.sched_getaffinity(0)) + 1}"],
            "CPU cores; use --max_parallel=",
        ),
        (_TWO_POINTS, ["--backend=slurm"], "--backend=slurm needs sbatch, which is not on PATH"),
        (
            _TWO_POINTS,
            ["--backend=slurm", "--slurm_executor=local", "--slurm_extra=account"],
            "--slurm_extra='account': write key=value",
        ),
    ],
)
def test_bad_sweep_exits_with_one_line_error_before_running(
    tmp_path, sweep_body, overrides, message
):
    header = "from diffusion_jax.runner.sweeps import product, sweep, zip_\n"
    sweep_file = _write_sweep(tmp_path, header + sweep_body)
    result = _run_sweep(sweep_file, tmp_path / "runs", *overrides)

    assert result.returncode != 0 and not (tmp_path / "runs").exists()
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_shipped_sweep_has_the_four_prediction_schedule_points():
    points = list(sweeps.load_sweep(os.path.join(REPO, "configs/sweeps/prediction_x_schedule.py")))
    assert sweeps.point_names(points) == [
        "prediction=eps,schedule=linear",
        "prediction=eps,schedule=cosine",
        "prediction=v,schedule=linear",
        "prediction=v,schedule=cosine",
    ]
    sweeps.validate_points(digits.get_config(), points)
