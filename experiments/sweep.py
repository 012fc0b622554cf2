r"""Train (and optionally evaluate) every point of a sweep, one after another, and tabulate them.

    python -m experiments.sweep --config=configs/digits.py \
        --sweep=configs/sweeps/prediction_x_schedule.py --workdir=workdirs/sweeps/pred_sched \
        [--config.training.num_train_steps=1000]    # applied to every point
        [--eval] [--metrics=loss,fd] [--print_commands]

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
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax.errors import ConfigError
from diffusion_jax.runner import cli, evaluate, setup, sweeps, train, validation
from diffusion_jax.runner import workdir as workdir_lib

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
flags.mark_flags_as_required(["config", "sweep", "workdir"])


class _Stop:
    """SIGTERM: remember it and pass it on to the running point, which saves and exits."""

    def __init__(self) -> None:
        self.requested = False
        self.child: subprocess.Popen[bytes] | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


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


def _run(argv: Sequence[str], stop: _Stop) -> int:
    sys.stdout.flush()
    with subprocess.Popen(argv) as child:
        stop.child = child
        returncode = child.wait()
    stop.child = None
    return returncode


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
        os.makedirs(sweep_dir, exist_ok=True)
        sweeps.write_sweep_file(sweep_dir, names, points)
    except OSError as error:
        sys.exit(f"error: cannot write the sweep directory --workdir={sweep_dir} ({error})")
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop.handle)
    failed: dict[str, str] = {}
    for i, (name, workdir, point_overrides, point_config) in enumerate(
        zip(names, workdirs, overrides, resolved, strict=True)
    ):
        if stop.requested:
            break
        target = point_config.training.num_train_steps
        step = workdir_lib.latest_step(workdir)
        prefix = f"[{i + 1}/{len(names)}] {name}:"
        if step >= target:
            print(f"{prefix} skipped, finished (checkpoint at step {step})", flush=True)
        else:
            start = f"resuming from step {step}" if step else "new run"
            print(f"{prefix} training to step {target} ({start})", flush=True)
            returncode = _run(_command(sys.executable, config_arg, workdir, point_overrides), stop)
            step = workdir_lib.latest_step(workdir)
            if returncode != 0:
                failed[name] = f"training exited with status {returncode}"
            elif step < target:
                failed[name] = f"training stopped at step {step} of {target}"
        if _EVAL.value and name not in failed and not stop.requested:
            print(f"{prefix} evaluating", flush=True)
            returncode = _run(
                _command(sys.executable, config_arg, workdir, point_overrides, mode="eval"), stop
            )
            if returncode != 0:
                failed[name] = f"eval exited with status {returncode}"
        if name in failed:
            print(f"{prefix} FAILED: {failed[name]}", flush=True)
        _write_results(sweep_dir, names, points, failed)  # so a long sweep shows its progress

    columns, rows = _write_results(sweep_dir, names, points, failed)
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


def _write_results(
    sweep_dir: str, names: Sequence[str], points: Sequence[sweeps.Point], failed: Mapping[str, str]
) -> tuple[list[str], list[dict[str, Any]]]:
    columns, rows = sweeps.collect_results(
        sweep_dir, names, points, metrics=_METRICS.value, failed=failed
    )
    sweeps.write_results(sweep_dir, columns, rows)
    return columns, rows


if __name__ == "__main__":
    sys.argv = cli.last_override_wins(sys.argv)  # config_flags reads the overrides from sys.argv
    if error := cli.command_line_error(sys.argv[1:]):
        sys.exit(error)
    app.run(main)
