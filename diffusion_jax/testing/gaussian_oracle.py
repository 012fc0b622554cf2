"""The exact case: data x0 ~ N(mu, s^2) i.i.d. per pixel, where everything is closed form.

With a = sqrt(ab_t) and sigma = sqrt(1 - ab_t), x_t ~ N(a mu, a^2 s^2 + sigma^2) and the
optimal predictors are
    eps*(x_t, t) = sigma (x_t - a mu) / (a^2 s^2 + sigma^2),
    x0*(x_t, t)  = mu + a s^2 (x_t - a mu) / (a^2 s^2 + sigma^2),   v* = a eps* - sigma x0*.
The probability-flow ODE maps x at t_start to t = 0 affinely:
    x_0 - a_0 mu = sqrt(a_0^2 s^2 + sigma_0^2) / sqrt(a_T^2 s^2 + sigma_T^2) * (x_T - a_T mu).
Samplers run with `optimal_model` and compared with `exact_ode_solution` therefore show pure
discretisation error: the tests and `benchmarks/sampler_gaussian_error.py` use both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, samplers
from diffusion_jax.schedules import Schedule


def optimal_model(
    sch: Schedule, mu: float, s: float, prediction: str = "eps"
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The optimal `model_fn(x_t (B, ...), t (B,)) -> (B, ...)` outputting `prediction`."""

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        ab = diffusion.extract(sch.alphas_cumprod, t, x_t.ndim)
        a, sigma = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
        var = a * a * s * s + sigma * sigma
        eps = sigma * (x_t - a * mu) / var
        x0 = mu + a * s * s * (x_t - a * mu) / var
        return {"eps": eps, "x0": x0, "v": a * eps - sigma * x0}[prediction]

    return model_fn


def exact_ode_solution(
    sch: Schedule, x_start: np.ndarray, t_start: int, mu: float, s: float
) -> np.ndarray:
    """float64, shape of x_start: the PF-ODE solution from x_start at t_start to t = 0, followed
    by x0*(., 0) as the deterministic samplers end."""
    ab = sch.alphas_cumprod
    a_t, sig_t = math.sqrt(ab[t_start]), math.sqrt(1 - ab[t_start])
    a_0, sig_0 = math.sqrt(ab[0]), math.sqrt(1 - ab[0])
    var_t, var_0 = a_t**2 * s**2 + sig_t**2, a_0**2 * s**2 + sig_0**2
    x_0 = a_0 * mu + math.sqrt(var_0 / var_t) * (np.asarray(x_start, np.float64) - a_t * mu)
    return mu + a_0 * s**2 * (x_0 - a_0 * mu) / var_0


def ode_error(
    sampler: str,
    num_steps: int,
    sch: Schedule,
    x_start: np.ndarray,
    mu: float,
    s: float,
    **kwargs: Any,
) -> float:
    """Max abs error of `samplers.sample` with `optimal_model` from x_start (clip_x0 off)
    against `exact_ode_solution` from the chain's first timestep (T - 1 unless a sigma spacing
    starts below it); kwargs go to `samplers.sample`."""
    spacing = kwargs.get("timestep_spacing", "linspace")
    first = samplers.get_timesteps(
        sch.num_timesteps, num_steps, spacing, alphas_cumprod=sch.alphas_cumprod
    )[0]
    out = samplers.sample(
        optimal_model(sch, mu, s),
        sch,
        x_start.shape,
        jax.random.key(0),
        sampler=sampler,
        num_steps=num_steps,
        clip_x0=False,
        x_init=jnp.asarray(x_start),
        **kwargs,
    )
    reference = exact_ode_solution(sch, x_start, int(first), mu, s)
    return float(np.max(np.abs(np.asarray(out, np.float64) - reference)))
