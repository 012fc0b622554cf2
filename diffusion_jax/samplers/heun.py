"""heun: Karras et al. 2022's 2nd-order Heun on the probability-flow ODE
dx~/dsigma = (x~ - D(x~; sigma)) / sigma (EDM Algorithm 1), with EDM Algorithm 2's churn:
before step i, raise sigma_i to sigma_hat = (1 + gamma_i) sigma_i (rounded onto a discrete
model's levels), gamma_i = min(s_churn / N, sqrt(2) - 1) where s_min <= sigma_i <= s_max (else
0), by adding noise of std s_noise sqrt(sigma_hat^2 - sigma_i^2); then the Heun step from
sigma_hat. Every interval but the last is Heun (trapezoid); the last, onto sigma = 0, is Euler,
which returns D. 2N - 1 model evaluations; second order with s_churn = 0 (the default).

Its first step needs a finite sigma_0: on a grid that starts at pure noise (flow's 'linspace')
use 'karras'. On the ddpm formulation's 'linspace' grid the first step starts at sigma(T-1)
(~157 for 'linear', ~2e4 for 'cosine'), so its default grid is 'karras' (from sigma_max = 80).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import Chain, Sampler, Scan, option, scan_inputs, vp_coefficients
from diffusion_jax.values import is_real

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class HeunOptions:
    """EDM Algorithm 2's churn: s_churn (0 = deterministic), the sigma range [s_min, s_max] it
    applies in, and the scale s_noise of the added noise."""

    s_churn: float = option(0.0, lambda v: f"churn{v:g}")
    s_min: float = option(0.0, lambda v: f"churnmin{v:g}")
    s_max: float = option(float("inf"), lambda v: f"churnmax{v:g}")
    s_noise: float = option(1.0, lambda v: f"snoise{v:g}")

    def check(self) -> None:
        for name in ("s_churn", "s_min", "s_noise"):
            value = getattr(self, name)
            if not is_real(value) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0; got {value!r}")
        if not is_real(self.s_max) or not self.s_max >= self.s_min:
            raise ValueError(f"s_max must be a number >= s_min={self.s_min!r}; got {self.s_max!r}")


def churn_gammas(sigmas: np.ndarray, options: HeunOptions) -> np.ndarray:
    """EDM Alg. 2's gamma_i (N,): min(s_churn / N, sqrt(2) - 1) where s_min <= sigma_i <= s_max,
    else 0 (N = the number of levels)."""
    n = sigmas.shape[0]
    gamma = min(float(options.s_churn) / n, np.sqrt(2.0) - 1.0)
    inside = (sigmas >= options.s_min) & (sigmas <= options.s_max)
    return np.where(inside, gamma, 0.0)


def heun_stages(
    sigmas: np.ndarray, sigma_hat: np.ndarray, s_noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 2N - 1 model evaluations as stages: stage 2i is the predictor of step i at
    sigma_hat_i, stage 2i + 1 its corrector at sigma_{i+1}, the last (2N - 2) the Euler step onto
    0. Returns, per stage, the sigma evaluated, the step delta (sigma_{i+1} - sigma_hat_i; the
    last: -sigma_hat), the std of the noise added before a predictor (0 for correctors), the
    step index i (noise index i + 1) and is_corrector."""
    n = sigmas.shape[0]
    noise_std = s_noise * np.sqrt(np.maximum(sigma_hat**2 - sigmas**2, 0.0))
    sigma_next = np.concatenate([sigmas[1:], [0.0]])
    num = 2 * n - 1
    level, delta, std = np.empty(num), np.empty(num), np.zeros(num)
    step, is_corr = np.empty(num, np.int32), np.zeros(num, bool)
    level[0::2], delta[0::2], std[0::2], step[0::2] = (
        sigma_hat,
        sigma_next - sigma_hat,
        noise_std,
        np.arange(n),
    )
    level[1::2], delta[1::2], step[1::2] = (
        sigmas[1:],
        (sigma_next - sigma_hat)[:-1],
        np.arange(n - 1),
    )
    is_corr[1::2] = True
    return level, delta, std, step, is_corr


def _build(chain: Chain) -> Scan:
    dtype, bcast, options = chain.dtype, chain.bcast, chain.options
    sigmas = chain.sigmas
    sigma_hat = chain.formulation.round_sigma(sigmas * (1.0 + churn_gammas(sigmas, options)))
    sigma_hat = np.maximum(sigma_hat, sigmas)
    stochastic = bool(np.any(sigma_hat > sigmas))
    level, delta, std, step, is_corr = heun_stages(sigmas, sigma_hat, float(options.s_noise))
    is_final = np.arange(level.shape[0]) == level.shape[0] - 1
    alpha, _ = vp_coefficients(level)

    # The state is x~ = x_vp / alpha (finite sigma only), as EDM's algorithms are written.
    def body(carry: tuple[Array, ...], xs: tuple[Any, ...]) -> tuple[Any, tuple[Array, Array]]:
        x_hat, x_eval, d_saved = carry
        k, lvl, sig, a, dlt, noise_std, corr, final = xs
        x_in = x_eval
        if stochastic:  # a predictor raises the noise level first (std 0 on correctors)
            x_in = x_eval + bcast(noise_std) * chain.temperature * chain.noise(k + 1)
        x_vp = bcast(a) * x_in
        d0, _ = chain.denoise(x_vp, lvl)
        d = (x_in - d0) / bcast(sig)  # dx~/dsigma of the PF ODE
        x_pred = x_in + bcast(dlt) * d
        x_corr = x_hat + bcast(dlt) * 0.5 * (d_saved + d)
        new_hat = jnp.where(corr, x_hat, x_in)
        new_eval = jnp.where(final, d0, jnp.where(corr, x_corr, x_pred))
        new_saved = jnp.where(corr, d_saved, d)
        new = (new_hat.astype(dtype), new_eval.astype(dtype), new_saved.astype(dtype))
        return new, (chain.denoise.own(x_vp, lvl), d0)

    x0 = (chain.x_init / bcast(jnp.asarray(vp_coefficients(sigmas[:1])[0][0]))).astype(dtype)
    xs = (
        jnp.asarray(step),
        chain.levels(level),
        *scan_inputs(level, alpha, delta, std),
        is_corr,
        is_final,
    )
    return Scan(body, (x0, x0, jnp.zeros_like(x0)), xs, lambda c: c[1], level)


def _check_grid(sigmas: np.ndarray, options: HeunOptions) -> None:
    if not np.isfinite(sigmas[0]):
        raise ValueError(
            "heun starts with a step from sigma_0, which must be finite; this grid starts at "
            "pure noise (sigma = inf): use timestep_spacing='karras' or 'logsnr'"
        )


SAMPLER = registry.register(
    Sampler(
        name="heun",
        build=_build,
        options=HeunOptions,
        num_evaluations=lambda num_steps: 2 * num_steps - 1,
        finite_start=True,
        check_grid=_check_grid,
        stochastic=lambda options: options.s_churn > 0,
        default_spacing="karras",
        summary="EDM's Heun (Alg. 1) with churn (Alg. 2); 2N - 1 evaluations, second order",
    )
)
