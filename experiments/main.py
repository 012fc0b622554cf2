r"""Train a diffusion model described by an ml_collections config, or use a trained one:
    python -m experiments.main --config=configs/digits.py --workdir=workdirs/digits [--mode=...]
Rerunning a train command resumes it; SIGTERM saves a checkpoint and exits with status 0.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import parallel
from diffusion_jax.errors import UserError
from diffusion_jax.runner import cli, edit, evaluate, posthoc, sample, train, visualize

# mode -> (run(config, workdir, allow_config_change=...), one-line summary of its result)
MODES: dict[str, tuple[Callable, Callable]] = {
    "train": (train.train, lambda state: f"Trained to step {int(state.step)}"),
    "sample": (sample.sample, lambda path: f"Wrote {path}"),
    "eval": (evaluate.evaluate, lambda result: result.summary()),
    "sdedit": (edit.sdedit_mode, lambda paths: "Wrote " + ", ".join(paths)),
    "inpaint": (edit.inpaint_mode, lambda paths: "Wrote " + ", ".join(paths)),
    "visualize": (visualize.visualize_mode, lambda paths: "Wrote " + ", ".join(paths)),
    "posthoc_ema": (posthoc.posthoc_ema_mode, lambda path: f"Wrote {path}"),
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory (or gs:// URL) for checkpoints, metrics and samples."
)
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    list(MODES),
    "train or resume; sample: samples/<name>.npz; eval: score eval.num_samples samples "
    "(eval/<name>.json); sdedit / inpaint: edit images of edit.split (edits/); visualize: "
    "forward and reverse process pictures (visualize/). See docs/modes.md.",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Use the workdir even though the config changes model.*, data.name, data.image_size or "
    "the diffusion schedule, timesteps or prediction of the run saved there.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0 in a multi-process run (auto-detected on SLURM, mpirun and TPU pods).",
)
_COORDINATOR_BIND = flags.DEFINE_string(
    "coordinator_bind_address",
    None,
    "HOST:PORT process 0 listens on (default: --coordinator_address itself, not every "
    "interface); e.g. 0.0.0.0:PORT when the coordinator address is not process 0's own.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:  # before any other JAX call: every process of a multi-process run joins first
        parallel.initialize_distributed(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _COORDINATOR_BIND.value
        )
    except (ValueError, RuntimeError) as error:
        sys.exit(
            f"error: starting jax.distributed failed ({error}); pass --coordinator_address, "
            "--num_processes and --process_id (0..num_processes-1), or run under SLURM/mpirun"
        )
    # Progress and warnings from process 0 only: every process sees the same config, workdir
    # and data, so the others would repeat each warning once per process (srun and mpirun
    # merge their output). They still report errors; --verbosity=N (N >= -1) overrides.
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(cli.log_level(jax.process_index()))
    logging.get_absl_handler().addFilter(cli.QuietLibraries())
    cli.drop_closed_event_loop_reports()
    run, summary = MODES[_MODE.value]
    try:
        result = run(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except UserError as error:  # bad input or a fault the user can fix: one line, no traceback
        sys.exit(f"error: {error}")
    logging.info("%s", summary(result))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    sys.argv = cli.last_override_wins(sys.argv)  # config_flags reads the overrides from sys.argv
    if error := cli.command_line_error(sys.argv[1:]):
        sys.exit(error)
    app.run(main)
