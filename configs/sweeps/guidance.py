r"""Classifier-free guidance scale x guidance interval on a trained class-conditional run,
scored by `experiments.sampler_table` (one eval per point and seed; docs/guidance.md).

    python -m experiments.sampler_table --config=configs/digits.py --workdir=workdirs/digits_cond \
        --config.model.class_conditional=True --sweep=configs/sweeps/guidance.py \
        --samplers=dpm_solver++2m_sde --steps=10,20 --seeds=0,1,2,3 \
        "--config.eval.metrics=('fd','class_accuracy')"

Points: unguided (scale 1), then scales 1.5, 2 and 3, each on every level and in the intervals
(0, 1], (0.3, 5], (0.5, 10] and (1, inf] (sigma_lo < sigma <= sigma_hi).
"""

from __future__ import annotations

from diffusion_jax.runner.sweeps import Sweep, chain, product, sweep


def get_sweep() -> Sweep:
    return chain(
        sweep("sampling.guidance_scale", [1.0]),
        product(
            sweep("sampling.guidance_scale", [1.5, 2.0, 3.0]),
            sweep(
                "sampling.guidance_interval",
                [(), (0.0, 1.0), (0.3, 5.0), (0.5, 10.0), (1.0, float("inf"))],
            ),
        ),
    )
