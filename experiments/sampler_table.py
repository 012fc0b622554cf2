r"""Score a trained run with many sampler settings (`--mode=eval` per cell, in one process), then
print the table of `experiments.eval_table`.

    python -m experiments.sampler_table --config=configs/digits.py --workdir=workdirs/digits \
        --samplers=ddpm,ddim,dpm_solver++ --steps=10,20,50 --spacings=linspace,karras \
        --gaussian_start=0,800 --seeds=0

Every combination is one eval (`eval/<name>.json`, resumable: a finished cell is only re-read);
`--config.*` overrides apply to all. --sweep=FILE (the grammar of `experiments.sweep`, over
`sampling.*` keys only) scores every point of it in every cell, e.g. guidance scale x interval
x guide (configs/sweeps/guidance.py). Combinations a sampler cannot run (more steps than the
Gaussian start leaves) are skipped. --gaussian_start is a ddpm timestep
(sampling.gaussian_start_t). `make digits-table` runs the table of docs/evaluation.md.
"""

from __future__ import annotations

import itertools
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax.analysis import load_eval_results
from diffusion_jax.errors import UserError
from diffusion_jax.runner import cli, evaluate, guide, sweeps, validation
from experiments.tables import format_table

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run's workdir.")
_SAMPLERS = flags.DEFINE_list("samplers", ["ddpm", "ddim", "dpm_solver++"], "Samplers.")
_STEPS = flags.DEFINE_list("steps", ["10", "20", "50"], "Step counts (sampling.num_steps).")
_SPACINGS = flags.DEFINE_list(
    "spacings",
    ["default"],
    "sampling.timestep_spacing values; 'default' = each sampler's own on the formulation.",
)
_GAUSSIAN_START = flags.DEFINE_list("gaussian_start", ["0"], "sampling.gaussian_start_t values.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "sampling.seed values.")
_METRIC = flags.DEFINE_string("metric", "fd", "Metric to tabulate.")
_SWEEP = flags.DEFINE_string(
    "sweep", None, "A sweep file over sampling.* keys; each point is scored in every cell."
)
flags.mark_flags_as_required(["config", "workdir"])
# The sampling keys this program's flags set (a --sweep file may not).
_FLAG_KEYS = tuple(
    f"sampling.{k}"
    for k in ("sampler", "num_steps", "timestep_spacing", "gaussian_start_t", "seed")
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cells = itertools.product(
        _SAMPLERS.value,
        [int(n) for n in _STEPS.value],
        _SPACINGS.value,
        [int(t) for t in _GAUSSIAN_START.value],
        [int(s) for s in _SEEDS.value],
    )
    logging.get_absl_handler().addFilter(cli.QuietLibraries())
    try:
        points = sweeps.sampling_points(_SWEEP.value, _FLAG_KEYS)
        configs = []
        for (sampler, num_steps, spacing, start, seed), point in itertools.product(cells, points):
            if start and num_steps > start + 1:
                continue
            config = sweeps.apply_overrides(_CONFIG.value, point)
            config.sampling.update(
                sampler=sampler,
                num_steps=num_steps,
                timestep_spacing="" if spacing == "default" else spacing,
                gaussian_start_t=start,
                seed=seed,
            )
            config.eval.bpd_num_images = 0
            # Every cell checked before the first samples: a bad one stops the table at once.
            validation.validate(config, jax.device_count(), evaluate.VALIDATORS)
            guide.check(config, _WORKDIR.value)
            configs.append(config)
        for config in configs:
            print(evaluate.evaluate(config, _WORKDIR.value).summary(), flush=True)
    except UserError as error:
        sys.exit(f"error: {error}")
    print(format_table(load_eval_results(_WORKDIR.value), _METRIC.value))


if __name__ == "__main__":
    if error := cli.unknown_override_key(sys.argv[1:]):
        sys.exit(error)
    app.run(main)
