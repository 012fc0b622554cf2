r"""Train (and optionally evaluate) every point of a sweep and tabulate them.

    python -m experiments.sweep --config=configs/digits.py \
        --sweep=configs/sweeps/prediction_x_schedule.py --workdir=workdirs/sweeps/pred_sched \
        [--config.training.num_train_steps=1000]    # applied to every point
        [--eval] [--metrics=loss,fd] [--print_commands]
        [--backend=local | local_parallel --max_parallel=N | slurm --slurm_partition=... ...]

Each point trains in its own subprocess, `python -m experiments.main --config=... \
--workdir=DIR/<point name> <--config.* overrides> <the point's overrides>`. Rerunning the same
command skips points whose latest checkpoint reaches `training.num_train_steps` and resumes the
others (the trainer resumes a workdir by itself). A failing point is reported and the sweep goes
on; the exit status is 1 if any failed. After every point `DIR/results.csv` and `DIR/results.md`
are rewritten: the point's overrides, status, step, final training loss and the eval results of
`DIR/<point>/eval/*.json`. `--eval` runs `--mode=eval` for each trained point (every time: the
eval mode itself resumes). `--print_commands` prints one shell line per point for a cluster
scheduler and runs nothing. SIGTERM is passed on to the running point, which saves a checkpoint;
the sweep then stops, and rerunning it continues.

`--backend` (`diffusion_jax.runner.sweep_backends`): `local` runs the points one after another;
`local_parallel` runs `--max_parallel` at once, each pinned to its own CPU cores and GPUs, logs in
`DIR/logs/`; `slurm` submits a job array through submitit (`--slurm_*` flags), one task per
unfinished point. Every point's row is also a TensorBoard HParams session in
`DIR/<point>/hparams/` (`tensorboard --logdir DIR`, HPARAMS tab). See docs/sweeps.md.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax.errors import ConfigError
from diffusion_jax.runner import cli, evaluate, setup, sweep_backends, sweeps, train, validation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_SWEEP = flags.DEFINE_string("sweep", None, "Python file whose get_sweep() returns the points.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory; point i trains in DIR/<name_i>.")
_PRINT_COMMANDS = flags.DEFINE_bool(
    "print_commands", False, "Print one shell command line per point and run nothing."
)
_EVAL = flags.DEFINE_bool("eval", False, "After training, run --mode=eval for every point.")
_METRICS = flags.DEFINE_list(
    "metrics",
    None,
    "Metrics for the results table, from metrics.jsonl and eval/*.json (default: final loss "
    "and every eval metric).",
)
_BACKEND = flags.DEFINE_enum(
    "backend",
    "local",
    list(sweep_backends.BACKENDS),
    "local: one point after another; local_parallel: --max_parallel points at once, each on its "
    "own CPU cores / GPUs; slurm: a SLURM job array through submitit, one task per point.",
)
_MAX_PARALLEL = flags.DEFINE_integer(
    "max_parallel", 2, "local_parallel: how many points run at once (each gets 1/N of the devices)."
)
_SLURM_PARTITION = flags.DEFINE_string("slurm_partition", None, "slurm: the partition.")
_SLURM_TIME = flags.DEFINE_string(
    "slurm_time", "4:00:00", "slurm: time limit per point (minutes, H:MM:SS or D-HH:MM)."
)
_SLURM_NODES = flags.DEFINE_integer(
    "slurm_nodes", 1, "slurm: nodes per point (more than 1: one jax.distributed job across them)."
)
_SLURM_GPUS_PER_NODE = flags.DEFINE_integer("slurm_gpus_per_node", 0, "slurm: GPUs per node.")
_SLURM_CPUS_PER_TASK = flags.DEFINE_integer(
    "slurm_cpus_per_task", 0, "slurm: CPU cores per node (0: the cluster's default)."
)
_SLURM_MEM_GB = flags.DEFINE_float("slurm_mem_gb", 0, "slurm: memory per node in GB (0: default).")
_SLURM_ARRAY_PARALLELISM = flags.DEFINE_integer(
    "slurm_array_parallelism", 256, "slurm: at most this many points run at once."
)
_SLURM_EXTRA = flags.DEFINE_list(
    "slurm_extra", [], "slurm: more #SBATCH options as key=value, e.g. account=abc,qos=high."
)
_SLURM_WAIT = flags.DEFINE_bool(
    "slurm_wait",
    True,
    "slurm: wait for the jobs, then report failures and exit non-zero if any; false: exit after "
    "submitting (each job updates results.csv when it ends).",
)
_SLURM_EXECUTOR = flags.DEFINE_enum(
    "slurm_executor",
    "slurm",
    ["slurm", "local"],
    "slurm: submit with sbatch; local: submitit's LocalExecutor (the same job code as "
    "subprocesses of this machine, for testing).",
)
flags.mark_flags_as_required(["config", "sweep", "workdir"])


def _command(
    python: str,
    config_arg: str,
    workdir: str,
    overrides: Mapping[str, Any],
    mode: str | None = None,
) -> list[str]:
    """argv of `experiments.main` for one point (base overrides first, then the point's)."""
    argv = [python, "-m", "experiments.main", f"--config={config_arg}", f"--workdir={workdir}"]
    argv += [f"--config.{k}={sweeps.format_value(v)}" for k, v in overrides.items()]
    if mode is not None:
        argv.append(f"--mode={mode}")
    return argv


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config: ml_collections.ConfigDict = _CONFIG.value
    config_flag = flags.FLAGS["config"]
    config_arg = cli.config_argument(sys.argv[1:]) or config_flags.get_config_filename(config_flag)
    base = dict(config_flags.get_override_values(config_flag))
    sweep_dir = _WORKDIR.value
    assert sweep_dir is not None and _SWEEP.value is not None  # required flags
    try:
        points = list(sweeps.load_sweep(_SWEEP.value))
        names = sweeps.point_names(points)
        resolved = sweeps.validate_points(config, points, base)
        # Every section the points will use, so a bad value stops the sweep before any training.
        validators = (*train.VALIDATORS, *((evaluate.check_eval,) if _EVAL.value else ()))
        for name, point_config in zip(names, resolved, strict=True):
            # The points run elsewhere (subprocesses, a cluster): check them for the smallest
            # device count they accept, one fsdp group.
            num_devices = max(1, setup.fsdp_settings(point_config)[0])
            try:
                validation.validate(point_config, num_devices, validators)
            except ConfigError as error:
                raise sweeps.SweepError(f"point {name}: {error}") from None
    except sweeps.SweepError as error:
        sys.exit(f"error: {error}")

    workdirs = [os.path.join(sweep_dir, name) for name in names]
    overrides = [{**base, **point} for point in points]
    if _PRINT_COMMANDS.value:
        for workdir, point_overrides in zip(workdirs, overrides, strict=True):
            line = shlex.join(_command("python", config_arg, workdir, point_overrides))
            if _EVAL.value:
                line += " && " + shlex.join(
                    _command("python", config_arg, workdir, point_overrides, mode="eval")
                )
            print(line)
        return

    try:
        backend = _backend_options()
    except sweeps.SweepError as error:
        sys.exit(f"error: {error}")
    cwd = os.getcwd()
    jobs = tuple(
        sweep_backends.PointJob(
            name=name,
            label=f"[{i + 1}/{len(names)}] {name}",
            workdir=workdir,
            target_steps=point_config.training.num_train_steps,
            train_argv=tuple(_command(sys.executable, config_arg, workdir, point_overrides)),
            eval_argv=tuple(
                _command(sys.executable, config_arg, workdir, point_overrides, mode="eval")
            )
            if _EVAL.value
            else None,
            cwd=cwd,
        )
        for i, (name, workdir, point_overrides, point_config) in enumerate(
            zip(names, workdirs, overrides, resolved, strict=True)
        )
    )
    plan = sweep_backends.SweepPlan(
        sweep_dir=sweep_dir,
        names=tuple(names),
        points=tuple(points),
        jobs=jobs,
        metrics=None if _METRICS.value is None else tuple(_METRICS.value),
    )
    try:
        os.makedirs(sweep_dir, exist_ok=True)
        sweeps.write_sweep_file(sweep_dir, names, points)
    except OSError as error:
        sys.exit(f"error: cannot write the sweep directory --workdir={sweep_dir} ({error})")
    stop = sweep_backends.Stop()
    stop.install()
    report = functools.partial(print, flush=True)
    if _BACKEND.value == "local_parallel":
        assert isinstance(backend, list)
        failed = sweep_backends.run_local_parallel(plan, backend, stop, report)
    elif _BACKEND.value == "slurm":
        assert isinstance(backend, sweep_backends.SlurmOptions)
        failed = sweep_backends.run_slurm(plan, backend, stop, report)
    else:
        failed = sweep_backends.run_local(plan, stop, report)

    columns, rows = plan.write_results(failed, hparams_for=names)
    print(f"\n{sweeps.markdown_table(columns, rows)}")
    print(f"Wrote {os.path.join(sweep_dir, 'results.csv')} and results.md", flush=True)
    if stop.requested:
        sys.exit("error: stopped by SIGTERM; rerun the same command to continue the sweep")
    if failed:
        details = "; ".join(f"{n}: {why}" for n, why in failed.items())
        sys.exit(
            f"error: {len(failed)} of {len(names)} points failed ({details}); fix them and rerun "
            "the same command (finished points are skipped)"
        )


def _backend_options() -> list[sweep_backends.DeviceSlot] | sweep_backends.SlurmOptions | None:
    """The chosen backend's settings from the flags, checked before anything runs."""
    if _BACKEND.value == "local_parallel":
        return sweep_backends.device_slots(_MAX_PARALLEL.value)
    if _BACKEND.value != "slurm":
        return None
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise sweeps.SweepError(
            "--backend=slurm needs submitit: pip install -e '.[slurm]' (or pip install submitit)"
        ) from None
    if _SLURM_EXECUTOR.value == "slurm" and shutil.which("sbatch") is None:
        raise sweeps.SweepError(
            "--backend=slurm needs sbatch, which is not on PATH; run on a SLURM login node, or "
            "use --print_commands for another scheduler"
        )
    extra = {}
    for item in _SLURM_EXTRA.value:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise sweeps.SweepError(f"--slurm_extra={item!r}: write key=value, e.g. account=abc")
        extra[key.strip()] = value.strip()
    if _SLURM_NODES.value < 1:
        raise sweeps.SweepError(f"--slurm_nodes={_SLURM_NODES.value}; use 1 or more")
    return sweep_backends.SlurmOptions(
        partition=_SLURM_PARTITION.value,
        time_min=sweep_backends.parse_slurm_time(_SLURM_TIME.value),
        nodes=_SLURM_NODES.value,
        gpus_per_node=_SLURM_GPUS_PER_NODE.value,
        cpus_per_task=_SLURM_CPUS_PER_TASK.value,
        mem_gb=_SLURM_MEM_GB.value,
        array_parallelism=_SLURM_ARRAY_PARALLELISM.value,
        job_name=os.path.basename(os.path.normpath(_WORKDIR.value or "sweep")),
        additional=extra,
        executor=_SLURM_EXECUTOR.value,
        wait=_SLURM_WAIT.value,
    )


if __name__ == "__main__":
    sys.argv = cli.last_override_wins(sys.argv)  # config_flags reads the overrides from sys.argv
    if error := cli.command_line_error(sys.argv[1:]):
        sys.exit(error)
    app.run(main)
