"""ddim (alias euler): DDIM(eta) (Song et al. 2021), i.e. the Euler step on the probability-flow
ODE (eta = 0) or Euler-ancestral (eta > 0), written on D in x~ = x0 + sigma n:

    x~_next = D + sqrt(sigma_next^2 - up^2) (x~ - D) / sigma + up z,
    up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2,

(k-diffusion's `get_ancestral_step`; exactly DDIM's update on a VP chain, and flow matching's
Euler step in t). eta = 1 is ancestral sampling (== ddpm with 'fixed_small'). The last step,
onto sigma = 0, returns D. N model evaluations; first order in the number of steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import Chain, Sampler, Scan, option, scan_inputs, vp_coefficients
from diffusion_jax.values import is_real

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DDIMOptions:
    """eta: 0 deterministic (Euler), 1 ancestral; the noise scale of each step."""

    eta: float = option(0.0, lambda eta: f"eta{eta:g}")

    def check(self) -> None:
        if not is_real(self.eta) or not self.eta >= 0.0:
            raise ValueError(
                f"eta must be a number >= 0 (0 = deterministic DDIM); got {self.eta!r}"
            )


def _ratio_drop(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sigma_next (N,) (0 after the last) and 1 - (sigma_next / sigma)^2 (1 from sigma = inf)."""
    nxt = np.concatenate([sigmas[1:], [0.0]])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(np.isinf(sigmas), 0.0, nxt / sigmas)
    return nxt, 1.0 - ratio**2


def ddim_coefficients(sigmas: np.ndarray, eta: float) -> tuple[np.ndarray, ...]:
    """x_vp_next = c_x0 D + c_eps eps + c_z z, each float64 (N,), eps = (x_vp - alpha D) / s.

    Raises ValueError if eta makes the injected noise exceed the next level's."""
    nxt, drop = _ratio_drop(sigmas)
    up2 = eta**2 * nxt**2 * drop
    down2 = nxt**2 - up2
    if np.any(down2 < -1e-12 * np.maximum(nxt**2, 1e-300)):
        raise ValueError(
            f"eta={eta} makes the DDIM noise exceed the next noise level on this grid; "
            f"use eta <= {1.0 / np.sqrt(np.max(drop[:-1])):.4g}"
        )
    a_next, _ = vp_coefficients(nxt)
    return a_next, a_next * np.sqrt(np.maximum(down2, 0.0)), a_next * np.sqrt(up2)


def _build(chain: Chain) -> Scan:
    eta = chain.options.eta
    a, s = vp_coefficients(chain.sigmas)
    c_x0, c_eps, c_z = ddim_coefficients(chain.sigmas, eta)
    stochastic, dtype, bcast = eta > 0.0, chain.dtype, chain.bcast

    def body(x: Array, xs: tuple[Any, ...]) -> tuple[Array, tuple[Array, Array]]:
        k, level, ca, cs, a0, ae, az = xs
        d, _ = chain.denoise(x, level)
        eps = (x - bcast(ca) * d) / bcast(cs)
        x_next = bcast(a0) * d + bcast(ae) * eps
        if stochastic:
            x_next = x_next + bcast(az) * chain.temperature * chain.noise(k + 1)
        return x_next.astype(dtype), (chain.denoise.own(x, level), d)

    xs = (chain.steps, chain.levels(), *scan_inputs(a, s, c_x0, c_eps, c_z))
    return Scan(body, chain.x_init, xs, lambda x: x, chain.sigmas)


def _check_grid(sigmas: np.ndarray, options: DDIMOptions) -> None:
    if options.eta > 0:
        ddim_coefficients(sigmas, options.eta)


SAMPLER = registry.register(
    Sampler(
        name="ddim",
        build=_build,
        options=DDIMOptions,
        check_grid=_check_grid,
        stochastic=lambda options: options.eta > 0,
        summary="DDIM(eta) / Euler(-ancestral); N evaluations, first order",
    )
)
