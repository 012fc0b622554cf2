r"""Train, or sample from, a diffusion model described by an ml_collections config.

    python -m experiments.main --config=configs/digits.py --workdir=workdirs/digits
    python -m experiments.main --config=configs/digits.py --workdir=workdirs/digits --mode=sample \
        --config.sampling.sampler=ddim --config.sampling.num_steps=50

Rerunning a train command on the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import train_loop
from diffusion_jax.checkpointing import NoCheckpointError
from diffusion_jax.config_validation import ConfigError
from diffusion_jax.data.pipeline import DatasetNotPreparedError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample"], "What to do.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    config, workdir = _CONFIG.value, _WORKDIR.value
    try:
        if _MODE.value == "train":
            train_loop.train(config, workdir)
        else:
            path = train_loop.sample(config, workdir)
            logging.info("Wrote %s", path)
    except (ConfigError, NoCheckpointError, DatasetNotPreparedError) as error:
        # Bad input: one clear line, no traceback.
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
