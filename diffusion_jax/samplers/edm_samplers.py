"""Samplers of the EDM formulation (Karras et al. 2022), in sigma space: x = x0 + sigma n,
probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

The chain visits N noise levels sigma_0 > ... > sigma_{N-1} (Karras steps from sampling.sigma_max
to sigma_min with rho, `edm.karras_sigmas`, or geometric with 'logsnr') and then steps onto
sigma = 0, where x is the x0 prediction D(x; sigma_{N-1}) (the Euler step to 0). x starts as
sigma_0 * N(0, I).

    edm_euler               Euler on the ODE; N model evaluations, first order.
    edm_heun                EDM Algorithm 1: Heun (trapezoid) on every interval but the last
                            (Euler onto 0); 2N - 1 evaluations, second order.
    edm_stochastic          EDM Algorithm 2: before each step raise sigma_i to
                            sigma_hat = (1 + gamma_i) sigma_i, gamma_i = min(s_churn / N,
                            sqrt(2) - 1) where s_min <= sigma_i <= s_max (else 0), by adding noise
                            of std s_noise sqrt(sigma_hat^2 - sigma_i^2), then the Heun step from
                            sigma_hat; 2N - 1 evaluations. s_churn = 0 is edm_heun.
    edm_dpm_solver++        DPM-Solver++(2M) (Lu et al. 2022) in lambda = -ln sigma (alpha = 1):
                            the coefficients of `dpm_solver.multistep_coefficients`; N.
    edm_dpm_solver++2m_sde  DPM-Solver++(2M) SDE in the same variables; N evaluations.

Each is one `lax.scan` whose body evaluates the model once (Heun's predictor and corrector are
alternate iterations of the same body, as in `heun`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import Chain, Option, Sampler, SamplerOptions, Scan, scan_inputs
from diffusion_jax.samplers.dpm_solver import (
    LOWER_ORDER_FINAL,
    multistep_coefficients,
    multistep_scan,
    multistep_sde_coefficients,
)
from diffusion_jax.values import is_real

Array = jax.Array


def _sigmas(chain: Chain) -> np.ndarray:
    assert chain.sigmas is not None, "an edm sampler needs an edm chain (sigmas)"
    return np.asarray(chain.sigmas, np.float64)


def churn_gammas(sigmas: np.ndarray, options: SamplerOptions) -> np.ndarray:
    """EDM Alg. 2's gamma_i (N,): min(s_churn / N, sqrt(2) - 1) where s_min <= sigma_i <= s_max,
    else 0 (N = the number of noise levels, EDM's num_steps)."""
    n = sigmas.shape[0]
    gamma = min(float(options.s_churn) / n, np.sqrt(2.0) - 1.0)
    inside = (sigmas >= options.s_min) & (sigmas <= options.s_max)
    return np.where(inside, gamma, 0.0)


def heun_stages(
    sigmas: np.ndarray, gammas: np.ndarray, s_noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 2N - 1 model evaluations of Heun with churn as stages: stage 2i is the predictor of
    step i at sigma_hat_i = (1 + gamma_i) sigma_i, stage 2i + 1 its corrector at sigma_{i+1},
    the last (2N - 2) the Euler step onto 0. Returns, per stage, the sigma evaluated, the step
    delta (sigma_{i+1} - sigma_hat_i, the last: -sigma_hat), the std of the noise added before
    a predictor (0 for correctors), the step index i (noise index i + 1) and is_corrector."""
    n = sigmas.shape[0]
    sigma_hat = sigmas * (1.0 + gammas)
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


def _heun_scan(chain: Chain, gammas: np.ndarray) -> Scan:
    """Heun with churn (`heun_stages`); no noise is drawn when every gamma is 0."""
    dtype, bcast = chain.dtype, chain.bcast
    stochastic = bool(np.any(gammas > 0))
    temperature = chain.options.temperature
    level, delta, std, step, is_corr = heun_stages(
        _sigmas(chain), gammas, float(chain.options.s_noise)
    )
    is_final = np.arange(level.shape[0]) == level.shape[0] - 1

    def body(carry: tuple[Array, ...], xs: tuple[Array, ...]) -> tuple[Any, tuple[Array, Array]]:
        x_hat, x_eval, d_saved = carry
        k, sig, dlt, noise_std, corr, final = xs
        x_in = x_eval
        if stochastic:  # a predictor raises the noise level first (std 0 on correctors)
            x_in = x_eval + bcast(noise_std) * temperature * chain.noise(k + 1)
        d0, _ = chain.denoise(x_in, sig)
        d = (x_in - d0) / bcast(sig)  # dx/dsigma of the PF ODE
        x_pred = x_in + bcast(dlt) * d
        x_corr = x_hat + bcast(dlt) * 0.5 * (d_saved + d)
        new_hat = jnp.where(corr, x_hat, x_in)
        new_eval = jnp.where(final, d0, jnp.where(corr, x_corr, x_pred))
        new_saved = jnp.where(corr, d_saved, d)
        new = (new_hat.astype(dtype), new_eval.astype(dtype), new_saved.astype(dtype))
        return new, (x_in, d0)

    x0 = chain.x_init
    levels = scan_inputs(level)[0]
    xs = (jnp.asarray(step), levels, *scan_inputs(delta, std), is_corr, is_final)
    return Scan(body, (x0, x0, jnp.zeros_like(x0)), xs, lambda c: c[1], levels)


def _build_heun(chain: Chain) -> Scan:
    return _heun_scan(chain, np.zeros(_sigmas(chain).shape[0]))


def _build_stochastic(chain: Chain) -> Scan:
    sigmas = _sigmas(chain)
    return _heun_scan(chain, churn_gammas(sigmas, chain.options))


def _build_euler(chain: Chain) -> Scan:
    dtype, bcast = chain.dtype, chain.bcast
    sigmas = _sigmas(chain)
    delta = np.concatenate([sigmas[1:], [0.0]]) - sigmas
    is_final = np.arange(sigmas.shape[0]) == sigmas.shape[0] - 1

    def body(x: Array, xs: tuple[Array, ...]) -> tuple[Array, tuple[Array, Array]]:
        sig, dlt, final = xs
        d0, _ = chain.denoise(x, sig)
        x_next = jnp.where(final, d0, x + bcast(dlt) * (x - d0) / bcast(sig))
        return x_next.astype(dtype), (x, d0)

    levels = chain.ts
    return Scan(body, chain.x_init, (levels, *scan_inputs(delta), is_final), lambda x: x, levels)


def _sigma_space(chain: Chain) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """alpha = 1, sigma (N,) and h = ln(sigma_k / sigma_{k+1}) (N-1,): lambda = -ln sigma."""
    sigmas = _sigmas(chain)
    lam = -np.log(sigmas)
    return np.ones_like(sigmas), sigmas, lam[1:] - lam[:-1], np


def _build_dpm(chain: Chain) -> Scan:
    lof = bool(chain.options.lower_order_final)
    return multistep_scan(chain, *multistep_coefficients(*_sigma_space(chain), lof), None)


def _build_dpm_sde(chain: Chain) -> Scan:
    lof = bool(chain.options.lower_order_final)
    a, b, c, z = multistep_sde_coefficients(*_sigma_space(chain), lof)
    return multistep_scan(chain, a, b, c, np.zeros_like(a), z)


def _check_nonnegative(name: str) -> Any:
    def check(value: Any, options: SamplerOptions) -> None:
        if not is_real(value) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0; got {value!r}")

    return check


def _check_s_max(value: Any, options: SamplerOptions) -> None:
    if not is_real(value) or not value >= options.s_min:
        raise ValueError(f"s_max must be a number >= s_min={options.s_min!r}; got {value!r}")


# EDM Alg. 2's options; shown in file names where not their defaults (s_churn 0: deterministic).
STOCHASTIC_OPTIONS = (
    Option("s_churn", 0.0, lambda v: f"churn{v:g}", _check_nonnegative("s_churn")),
    Option("s_min", 0.0, lambda v: f"churnmin{v:g}", _check_nonnegative("s_min")),
    Option("s_max", float("inf"), lambda v: f"churnmax{v:g}", _check_s_max),
    Option("s_noise", 1.0, lambda v: f"snoise{v:g}", _check_nonnegative("s_noise")),
)


def _twice_minus_one(num_steps: int) -> int:
    return 2 * num_steps - 1


SAMPLER_EULER = registry.register(
    Sampler(name="edm_euler", build=_build_euler, ode=True, min_steps=1, formulation="edm")
)
SAMPLER_HEUN = registry.register(
    Sampler(
        name="edm_heun",
        build=_build_heun,
        ode=True,
        min_steps=1,
        num_evaluations=_twice_minus_one,
        formulation="edm",
    )
)
SAMPLER_STOCHASTIC = registry.register(
    Sampler(
        name="edm_stochastic",
        build=_build_stochastic,
        options=STOCHASTIC_OPTIONS,
        min_steps=1,
        num_evaluations=_twice_minus_one,
        formulation="edm",
    )
)
SAMPLER_DPM = registry.register(
    Sampler(
        name="edm_dpm_solver++",
        build=_build_dpm,
        options=(LOWER_ORDER_FINAL,),
        ode=True,
        min_steps=2,
        formulation="edm",
    )
)
SAMPLER_DPM_SDE = registry.register(
    Sampler(
        name="edm_dpm_solver++2m_sde",
        build=_build_dpm_sde,
        options=(LOWER_ORDER_FINAL,),
        min_steps=2,
        formulation="edm",
    )
)
