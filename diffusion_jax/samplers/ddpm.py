"""ddpm: ancestral sampling (Ho et al. 2020; Improved DDPM respacing) on the grid.

The grid is read as a variance-preserving chain with ab_k = alpha(sigma_k)^2 and
beta'_k = 1 - ab_k / ab_{k+1} (for the ddpm formulation: its respaced chain; all T steps when
N = T). x_{k+1} is drawn from the posterior q(x_{k+1} | x_k, x0 = D) with variance
'fixed_small' (the posterior's; == ddim with eta = 1) | 'fixed_large' (beta'_k) |
'learned_range' (a learned-variance model's own, interpolated between the two as in Improved
DDPM). The last step, onto sigma = 0, adds no noise and returns D. N model evaluations. RePaint
(`editing.inpaint`) takes the same reverse step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.formulations import Formulation
from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import Chain, Denoiser, Level, Sampler, Scan, option, scan_inputs

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DDPMOptions:
    """variance: 'fixed_small' | 'fixed_large' | 'learned_range' (learned-variance models)."""

    variance: str = option("fixed_small", str)

    def check(self) -> None:
        if self.variance not in diffusion.VARIANCES:
            raise ValueError(
                f"unknown variance {self.variance!r}; use one of {diffusion.VARIANCES}"
            )

    def check_formulation(self, formulation: Formulation) -> None:
        if self.variance == "learned_range" and not formulation.learned_variance:
            raise ValueError(
                "variance='learned_range' needs a model that outputs its variance "
                "(learn_sigma=True, config model.learn_sigma=True); use 'fixed_small' or "
                "'fixed_large' for this model"
            )


def chain_alphas_cumprod(sigmas: np.ndarray) -> np.ndarray:
    """ab = 1 / (1 + sigma^2) (N,) float64 of the grid."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.square(np.asarray(sigmas, np.float64)))


def _next(ab: np.ndarray) -> np.ndarray:
    return np.concatenate([ab[1:], [1.0]])


def posterior_coefficients(ab: np.ndarray, variance: str) -> tuple[Any, Any, Any]:
    """Posterior coefficients (on x0, on x_t) and std of the chain ab (N,), each (N,).

    For 'learned_range' the std is that of 'fixed_small' (the sampler replaces it by the
    model's; see `learned_range_bounds`) except for the noiseless last step.
    """
    ab_next = _next(ab)
    beta = 1.0 - ab / ab_next  # respaced beta'_k
    c_x0 = beta * np.sqrt(ab_next) / (1.0 - ab)
    c_xt = (1.0 - ab_next) * np.sqrt(1.0 - beta) / (1.0 - ab)
    var = beta if variance == "fixed_large" else beta * (1.0 - ab_next) / (1.0 - ab)
    # No noise on the last step (into clean data): Ho et al.'s nonzero mask at t = 0.
    is_last = np.arange(ab.shape[0]) == ab.shape[0] - 1
    std = np.where(is_last, 0.0, np.sqrt(var))
    return c_x0, c_xt, std


def learned_range_bounds(ab: np.ndarray) -> tuple[Any, Any]:
    """(min, max) log-variance of 'learned_range' on the chain, each (N,): the clipped log
    posterior variance and log beta'_k, as for a schedule built from the respaced betas
    (Improved DDPM). The last step's posterior variance is 0; its log is clipped to the step
    before's (to log beta' when N = 1), as `schedules` does at t = 0."""
    ab_next = _next(ab)
    beta = 1.0 - ab / ab_next
    post_var = beta * (1.0 - ab_next) / (1.0 - ab)
    n = ab.shape[0]
    last = post_var[n - 2 : n - 1] if n > 1 else beta[-1:]
    with np.errstate(divide="ignore"):
        min_log = np.log(np.concatenate([post_var[:-1], last]))
        return min_log, np.log(beta)


def reverse_step(
    denoise: Denoiser,
    x: Array,
    level: Level,
    coefficients: tuple[Array, Array, Array, Array, Array],
    z: Array,
    *,
    learned: bool,
    temperature: Any,
) -> tuple[Array, Array]:
    """(x_next, D): one ancestral step from x_vp (B, ...) at `level` with noise z (B, ...).

    coefficients: this step's (c_x0, c_xt, std, min_log, max_log) of `posterior_coefficients`
    and `learned_range_bounds`, each (1, ..., 1); learned: variance 'learned_range'.
    """
    c_x0, c_xt, std, min_log, max_log = coefficients
    x0, var_values = denoise(x, level)
    if learned:
        assert var_values is not None  # learn_sigma is checked with the variance
        _, log_var = diffusion.learned_range_log_variance(min_log, max_log, var_values)
        # std is 0 on the last step (no noise into clean data), else the model's.
        std = jnp.where(std > 0, jnp.exp(0.5 * log_var), 0.0)
    return c_x0 * x0 + c_xt * x + std * temperature * z, x0


def _build(chain: Chain) -> Scan:
    ab = chain_alphas_cumprod(chain.sigmas)
    variance, dtype = chain.options.variance, chain.dtype
    c_x0, c_xt, std = posterior_coefficients(ab, variance)
    min_log, max_log = learned_range_bounds(ab)
    learned = variance == "learned_range"

    def body(x: Array, xs: tuple[Any, ...]) -> tuple[Array, tuple[Array, Array]]:
        k, level, *coefficients = xs
        x_next, x0 = reverse_step(
            chain.denoise,
            x,
            level,
            tuple(chain.bcast(c) for c in coefficients),  # type: ignore[arg-type]
            chain.noise(k + 1),
            learned=learned,
            temperature=chain.temperature,
        )
        return x_next.astype(dtype), (chain.denoise.own(x, level), x0)

    xs = (chain.steps, chain.levels(), *scan_inputs(c_x0, c_xt, std, min_log, max_log))
    return Scan(body, chain.x_init, xs, lambda x: x, chain.sigmas)


SAMPLER = registry.register(
    Sampler(
        name="ddpm",
        build=_build,
        options=DDPMOptions,
        stochastic=lambda options: True,
        summary="ancestral sampling (fixed_small / fixed_large / learned_range); N evaluations",
    )
)
