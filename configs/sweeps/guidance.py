r"""Guidance scale x guidance interval for a trained run, scored by `experiments.sampler_table`
(one eval per point; docs/guidance.md). Set the guide on the command line: none for a
class-conditional run (classifier-free guidance), or `--config.sampling.guide=step:1000`
(autoguidance, any run).

    python -m experiments.sampler_table --config=configs/digits.py --workdir=workdirs/digits \
        --sweep=configs/sweeps/guidance.py --samplers=dpm_solver++2m_sde --steps=20 \
        --seeds=0,1 --config.sampling.guide=step:1000

Points: guidance_scale 1.2, 1.5, 2 (1 = unguided is the plain table cell), each on every level
and in the interval (0.3, 5] (sigma_lo < sigma <= sigma_hi).
"""

from __future__ import annotations

from diffusion_jax.runner.sweeps import Sweep, product, sweep


def get_sweep() -> Sweep:
    return product(
        sweep("sampling.guidance_scale", [1.2, 1.5, 2.0]),
        sweep("sampling.guidance_interval", [(), (0.3, 5.0)]),
    )
