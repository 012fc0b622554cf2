"""heun: Karras et al. 2022 (EDM) 2nd-order Heun on the probability-flow ODE in y = x / a,
sigma = sigma_t / a_t; the step from sigma(tau_{N-1}) (t = 0 on most spacings) to sigma = 0 is
Euler, which returns the x0 prediction there. 2N - 1 model evaluations.

Accuracy (benchmarks/sampler_gaussian_error.py): second order in the number of steps. On
'linspace' its first step starts at sigma(T-1) (~157 for 'linear', ~2e4 for 'cosine', where
heun needs ~80+ steps to be accurate); use the 'karras' spacing (EDM's, from sigma_max = 80).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import Chain, Sampler, Scan, array_module, scan_inputs

Array = jax.Array


def heun_stages(timesteps: np.ndarray, ab: Any) -> tuple[np.ndarray, Any, Any, Any, np.ndarray]:
    """Heun's 2N - 1 model evaluations as stages (predictor at tau_k, corrector at tau_{k+1},
    ..., final Euler at t = 0): timestep, sigma, a = sqrt(ab), step delta, is_corrector."""
    xp = array_module(ab)
    sigma = xp.sqrt((1.0 - ab) / ab)
    n = timesteps.shape[0]
    pred, corr = np.arange(n - 1), np.arange(1, n)
    # Interleave: stage 2k = predictor at k, stage 2k + 1 = corrector at k + 1, stage 2N-2 final.
    order = np.empty(2 * n - 1, dtype=np.int64)
    order[0:-1:2], order[1::2], order[-1] = pred, corr, n - 1
    is_corr = np.zeros(2 * n - 1, dtype=bool)
    is_corr[1::2] = True
    delta_interval = sigma[1:] - sigma[:-1]  # (N-1,) < 0
    delta = xp.concatenate([xp.repeat(delta_interval, 2), -sigma[-1:]])
    return timesteps[order], sigma[order], xp.sqrt(ab)[order], delta, is_corr


def _build(chain: Chain) -> Scan:
    dtype, bcast = chain.dtype, chain.bcast
    stage_ts, sigma, sqrt_ab, delta, is_corr = heun_stages(chain.timesteps, chain.alphas_cumprod)
    num_stages = stage_ts.shape[0]
    is_final = np.arange(num_stages) == num_stages - 1

    def body(carry: tuple[Array, ...], xs: tuple[Array, ...]) -> tuple[Any, tuple[Array, Array]]:
        y_base, y_eval, d_saved = carry
        t_step, sig, a, dlt, corr, final = xs
        x_in = bcast(a) * y_eval
        d0, _ = chain.denoise(x_in, t_step)
        d = (y_eval - d0) / bcast(sig)  # dy/dsigma of the PF ODE
        # Predictor: Euler to the next sigma. Corrector: trapezoid with the saved slope.
        y_pred = y_base + bcast(dlt) * d
        y_corr = y_base + bcast(dlt) * 0.5 * (d_saved + d)
        new_base = jnp.where(corr, y_corr, y_base)
        new_eval = jnp.where(final, d0, jnp.where(corr, y_corr, y_pred))
        new_saved = jnp.where(corr, d_saved, d)
        new = (new_base.astype(dtype), new_eval.astype(dtype), new_saved.astype(dtype))
        return new, (x_in, d0)

    y_init = chain.x_init / bcast(jnp.asarray(sqrt_ab[0]))
    eval_ts = jnp.asarray(stage_ts, jnp.int32)
    xs = (eval_ts, *scan_inputs(sigma, sqrt_ab, delta), is_corr, is_final)
    return Scan(body, (y_init, y_init, jnp.zeros_like(y_init)), xs, lambda c: c[1], eval_ts)


SAMPLER = registry.register(
    Sampler(
        name="heun",
        build=_build,
        ode=True,
        min_steps=2,
        num_evaluations=lambda num_steps: 2 * num_steps - 1,
    )
)
