"""ddpm: ancestral sampling on the respaced chain tau (Ho et al. 2020; Improved DDPM respacing).

beta'_k = 1 - ab[tau_k] / ab[tau_{k+1}] (all T steps when N = T); x_{tau_{k+1}} is drawn from
the posterior q(x_{tau_{k+1}} | x_{tau_k}, x0) of the (clipped) x0 prediction, with variance
'fixed_small' (the posterior's) | 'fixed_large' (beta'_k) | 'learned_range' (a learn_sigma
model's own, interpolated on the respaced chain between the two, as in Improved DDPM). The last
step, into clean data, adds no noise and returns the x0 prediction at t = 0. N model
evaluations. RePaint (`editing.inpaint`) takes the same reverse step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
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
from diffusion_jax.samplers.denoise import Denoiser

Array = jax.Array


def posterior_coefficients(ab: Any, variance: str) -> tuple[Any, Any, Any]:
    """Posterior coefficients (on x0, on x_t) and std of the respaced chain, each (N,).

    For 'learned_range' the std is that of 'fixed_small' (the sampler replaces it by the
    model's; see `learned_range_bounds`) except for the noiseless last step.
    """
    xp = array_module(ab)
    ab_next = next_alphas_cumprod(ab)
    beta = 1.0 - ab / ab_next  # respaced beta'_k
    c_x0 = beta * xp.sqrt(ab_next) / (1.0 - ab)
    c_xt = (1.0 - ab_next) * xp.sqrt(1.0 - beta) / (1.0 - ab)
    var = beta if variance == "fixed_large" else beta * (1.0 - ab_next) / (1.0 - ab)
    # No noise on the last step (into clean data): Ho et al.'s nonzero mask at t = 0.
    is_last = xp.arange(ab.shape[0]) == ab.shape[0] - 1
    std = xp.where(is_last, 0.0, xp.sqrt(var))
    return c_x0, c_xt, std


def learned_range_bounds(ab: Any) -> tuple[Any, Any]:
    """(min, max) log-variance of 'learned_range' on the respaced chain, each (N,): the clipped
    log posterior variance and log beta'_k, as for a schedule built from the respaced betas
    (Improved DDPM). The last step's posterior variance is 0; its log is clipped to the step
    before's (to log beta' when N = 1), as `schedules` does at t = 0."""
    xp = array_module(ab)
    ab_next = next_alphas_cumprod(ab)
    beta = 1.0 - ab / ab_next
    post_var = beta * (1.0 - ab_next) / (1.0 - ab)
    n = ab.shape[0]
    last = post_var[n - 2 : n - 1] if n > 1 else beta[-1:]
    min_log = xp.log(xp.concatenate([post_var[:-1], last]))
    return min_log, xp.log(beta)


def reverse_step(
    denoise: Denoiser,
    x: Array,
    t_step: Array,
    coefficients: tuple[Array, Array, Array, Array, Array],
    z: Array,
    *,
    learned: bool,
    temperature: Any,
) -> tuple[Array, Array]:
    """(x_next, x0): one ancestral step from x (B, ...) at t_step with noise z (B, ...).

    coefficients: this step's (c_x0, c_xt, std, min_log, max_log) of `posterior_coefficients`
    and `learned_range_bounds`, each (1, ..., 1); learned: variance 'learned_range'.
    """
    c_x0, c_xt, std, min_log, max_log = coefficients
    x0, _, var_values = denoise.with_variance(x, t_step)
    if learned:
        assert var_values is not None  # learn_sigma is checked with the variance
        _, log_var = diffusion.learned_range_log_variance(min_log, max_log, var_values)
        # std is 0 on the last step (no noise into clean data), else 1 times the model's.
        std = jnp.where(std > 0, jnp.exp(0.5 * log_var), 0.0)
    return c_x0 * x0 + c_xt * x + std * temperature * z, x0


def _build(chain: Chain) -> Scan:
    ab, options, dtype = chain.alphas_cumprod, chain.options, chain.dtype
    c_x0, c_xt, std = posterior_coefficients(ab, options.variance)
    min_log, max_log = learned_range_bounds(ab)
    learned = options.variance == "learned_range"

    def body(x: Array, xs: tuple[Array, ...]) -> tuple[Array, tuple[Array, Array]]:
        k, t_step, *coefficients = xs
        a0, at, s, lo, hi = (chain.bcast(c) for c in coefficients)
        assert isinstance(chain.denoise, Denoiser)  # a ddpm-formulation chain
        x_next, x0 = reverse_step(
            chain.denoise,
            x,
            t_step,
            (a0, at, s, lo, hi),
            chain.noise(k + 1),
            learned=learned,
            temperature=options.temperature,
        )
        return x_next.astype(dtype), (x, x0)

    xs = (chain.steps, chain.ts, *scan_inputs(c_x0, c_xt, std, min_log, max_log))
    return Scan(body, chain.x_init, xs, lambda x: x, chain.ts)


def _check_variance(variance: Any, options: SamplerOptions) -> None:
    if variance not in diffusion.VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; use one of {diffusion.VARIANCES}")
    if variance == "learned_range" and not options.learn_sigma:
        raise ValueError(
            "variance='learned_range' needs a model that outputs its variance (learn_sigma=True, "
            "config model.learn_sigma=True); use 'fixed_small' or 'fixed_large' for this model"
        )


VARIANCE = Option("variance", "fixed_small", label=str, check=_check_variance)

SAMPLER = registry.register(Sampler(name="ddpm", build=_build, options=(VARIANCE,)))
