"""ddim: Song et al. 2021 on the timesteps tau; eta = 0 is deterministic (first order in the
number of steps on the probability-flow ODE), eta = 1 is ancestral sampling (== ddpm
'fixed_small') on tau. The last step, to ab = 1, returns the x0 prediction at t = 0. N model
evaluations.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import (
    Chain,
    Option,
    Sampler,
    SamplerOptions,
    Scan,
    array_module,
    next_alphas_cumprod,
    scan_inputs,
)
from diffusion_jax.values import is_real

Array = jax.Array


def ddim_coefficients(ab: Any, eta: float) -> tuple[Any, Any, Any]:
    """x_next = c_x0 x0 + c_eps eps + c_z z, each (N,); c_z = eta-scaled DDIM sigma.

    Raises ValueError (numpy ab only) if eta makes the noise exceed 1 - alpha_bar.
    """
    xp = array_module(ab)
    ab_next = next_alphas_cumprod(ab)
    sigma2 = eta**2 * (1.0 - ab_next) / (1.0 - ab) * (1.0 - ab / ab_next)
    c_eps2 = 1.0 - ab_next - sigma2
    if xp is np and np.any(c_eps2 < -1e-12):
        max_eta = float(np.sqrt(np.min((1.0 - ab) / (1.0 - ab / ab_next))))
        raise ValueError(
            f"eta={eta} makes the DDIM noise exceed 1 - alpha_bar on these timesteps; "
            f"use eta <= {max_eta:.4g}"
        )
    return xp.sqrt(ab_next), xp.sqrt(xp.maximum(c_eps2, 0.0)), xp.sqrt(sigma2)


def _build(chain: Chain) -> Scan:
    options, dtype, bcast = chain.options, chain.dtype, chain.bcast
    c_x0, c_eps, c_z = ddim_coefficients(chain.alphas_cumprod, options.eta)
    stochastic = options.eta > 0.0

    def body(x: Array, xs: tuple[Array, ...]) -> tuple[Array, tuple[Array, Array]]:
        k, t_step, a0, ae, az = xs
        x0, eps = chain.denoise(x, t_step)
        x_next = bcast(a0) * x0 + bcast(ae) * eps
        if stochastic:
            x_next = x_next + bcast(az) * options.temperature * chain.noise(k + 1)
        return x_next.astype(dtype), (x, x0)

    xs = (chain.steps, chain.ts, *scan_inputs(c_x0, c_eps, c_z))
    return Scan(body, chain.x_init, xs, lambda x: x, chain.ts)


def _check_eta(eta: Any, options: SamplerOptions) -> None:
    if not is_real(eta) or not eta >= 0.0:
        raise ValueError(f"eta must be a number >= 0 (0 = deterministic DDIM); got {eta!r}")


def _check_on_schedule(ab: np.ndarray, options: SamplerOptions) -> None:
    if options.eta > 0:
        ddim_coefficients(ab, options.eta)


ETA = Option("eta", 0.0, label=lambda eta: f"eta{eta:g}", check=_check_eta)

SAMPLER = registry.register(
    Sampler(name="ddim", build=_build, options=(ETA,), check_on_schedule=_check_on_schedule)
)
