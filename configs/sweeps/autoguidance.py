r"""Autoguidance guide x scale on any trained run (unconditional too), scored by
`experiments.sampler_table` (docs/guidance.md). The run must keep checkpoints 500 and 1000
(`--config.training.checkpoint_every=250 --config.training.max_checkpoints_to_keep=10`) and have
the post-hoc EMA 0.05 reconstructed (`--mode=posthoc_ema --config.posthoc_ema.sigma_rel=0.05`).

    python -m experiments.sampler_table --config=configs/digits.py --workdir=workdirs/digits_ph \
        --sweep=configs/sweeps/autoguidance.py --samplers=dpm_solver++2m_sde --steps=10,20 \
        --seeds=0,1,2,3,4,5,6,7

Points: unguided (scale 1), then the guides step:500, step:1000 (earlier checkpoints) and
posthoc_ema:0.05 (a shorter EMA), each at scales 1.2, 1.5, 2 and 3.
"""

from __future__ import annotations

from diffusion_jax.runner.sweeps import Sweep, chain, product, sweep


def get_sweep() -> Sweep:
    return chain(
        sweep("sampling.guidance_scale", [1.0]),
        product(
            sweep("sampling.guide", ["step:500", "step:1000", "posthoc_ema:0.05"]),
            sweep("sampling.guidance_scale", [1.2, 1.5, 2.0, 3.0]),
        ),
    )
