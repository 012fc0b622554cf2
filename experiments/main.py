r"""Train, or sample from, a diffusion model described by an ml_collections config.

    python -m experiments.main --config=configs/digits.py --workdir=workdirs/digits
    python -m experiments.main --config=configs/digits.py --workdir=workdirs/digits --mode=sample \
        --config.sampling.sampler=ddim --config.sampling.num_steps=50

Rerunning a train command on the same workdir resumes from its latest checkpoint; SIGTERM
saves a checkpoint at the current step and exits with status 0. A resume that changes the
model's shape or meaning is refused unless --allow_config_change is given.
"""

from __future__ import annotations

import logging as std_logging
import runpy
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import parallel, train_loop
from diffusion_jax.checkpointing import (
    CheckpointSaveError,
    CorruptCheckpointError,
    NoCheckpointError,
)
from diffusion_jax.config_validation import ConfigError
from diffusion_jax.data.pipeline import DatasetNotPreparedError
from diffusion_jax.evaluation.eval_config import MissingEvalInputError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "sample", "eval", "sdedit", "inpaint", "visualize"],
    "train: train or resume; sample: write samples/<name>.npz; eval: sample eval.num_samples "
    "images in resumable shards and score them (eval/<name>.json); sdedit / inpaint: edit "
    "images of edit.split (edits/); visualize: forward and reverse process pictures "
    "(visualize/).",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir even though the config changes model.*, data.name, data.image_size or "
    "the diffusion schedule, timesteps or prediction of the run saved there.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0 in a multi-process run (auto-detected on SLURM, mpirun and TPU pods).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
    """Keep our progress lines; drop the checkpoint and data libraries' INFO chatter."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        noisy = any(
            part in record.pathname for part in ("/orbax/", "/grain/", "/tensorflow_datasets/")
        )
        return record.levelno >= std_logging.WARNING or not noisy


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Before any other JAX call: in a multi-process run every process must join first.
    try:
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except (ValueError, RuntimeError) as error:
        sys.exit(
            f"error: starting jax.distributed failed ({error}); pass --coordinator_address, "
            "--num_processes and --process_id (0..num_processes-1), or run under SLURM/mpirun"
        )
    # Progress from process 0 only; the others report warnings and errors.
    logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    config, workdir = _CONFIG.value, _WORKDIR.value
    assert workdir is not None  # a required flag
    try:
        allow = _ALLOW_CONFIG_CHANGE.value
        if _MODE.value == "train":
            train_loop.train(config, workdir, allow_config_change=allow)
        elif _MODE.value == "sample":
            path = train_loop.sample(config, workdir, allow_config_change=allow)
            logging.info("Wrote %s", path)
        elif _MODE.value == "eval":
            from diffusion_jax.evaluation import evaluate

            result = evaluate.evaluate(config, workdir, allow_config_change=allow)
            logging.info(
                "Eval %s at step %d: %s (%s)",
                result.name,
                result.step,
                ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()),
                result.path,
            )
        else:
            from diffusion_jax import edit_modes

            for path in edit_modes.run_mode(
                _MODE.value, config, workdir, allow_config_change=allow
            ):
                logging.info("Wrote %s", path)
    except (
        ConfigError,
        NoCheckpointError,
        DatasetNotPreparedError,
        MissingEvalInputError,
    ) as error:
        # Bad input: one clear line, no traceback.
        sys.exit(f"error: {error}")
    except (
        CheckpointSaveError,
        CorruptCheckpointError,
        train_loop.NonFiniteError,
    ) as error:
        # Faults during the run: one line naming the cause and what to do next.
        sys.exit(f"error: {error}")


def _unknown_override_keys(argv: list[str]) -> str | None:
    """The first `--config.a.b=` override naming no key of the config file, as an error line.

    ml_collections would raise a bare AttributeError deep inside flag parsing; this says which
    key is unknown and which keys exist there instead.
    """
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_arg is None:
        return None
    path, _, arg = config_arg.partition(":")
    try:
        get_config = runpy.run_path(path)["get_config"]
        config = get_config(arg) if arg else get_config()
    except Exception:  # a broken config file: config_flags reports it with its traceback
        return None
    for flag in argv:
        if not flag.startswith("--config."):
            continue
        node, keys = config, flag[len("--config.") :].split("=", 1)[0].split(".")
        for depth, key in enumerate(keys):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                where = ".".join(keys[:depth]) or "the config"
                known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                return f"error: unknown config key {'.'.join(keys)!r}; keys in {where}: {known}"
            node = node[key]
    return None


if __name__ == "__main__":
    if error := _unknown_override_keys(sys.argv[1:]):
        sys.exit(error)
    app.run(main)
