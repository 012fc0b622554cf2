"""The exact case: data x0 ~ N(mu, s^2) i.i.d. per pixel, where everything is closed form.

In the samplers' variance-preserving coordinates (`formulations.base`) at noise level sigma,
x_vp = a x0 + sn n with a = 1 / sqrt(1 + sigma^2) and sn = sigma a, so x_vp ~ N(a mu,
a^2 s^2 + sn^2) and the optimal denoiser is

    x0*(x_vp; sigma) = E[x0 | x_vp] = mu + a s^2 (x_vp - a mu) / (a^2 s^2 + sn^2)

(at sigma = inf, flow matching's t = 1: a = 0, sn = 1 and x0* = mu). The probability-flow ODE
keeps the standardised value (x_vp - a mu) / sqrt(a^2 s^2 + sn^2) fixed, so it maps x_vp at any
level to any other affinely (`exact_flow`). Samplers run with the optimal network
(`optimal_net`: for any formulation, the output whose denoiser is x0*) and compared with
`exact_solution` therefore show pure discretisation error (`ode_error`): the tests and
`benchmarks/sampler_gaussian_error.py` use them.

For the ddpm formulation x_vp is x_t itself (a = sqrt(ab_t), sn = sqrt(1 - ab_t)) and the
schedule-based helpers of earlier releases remain: `optimal_model(sch, ...)` outputs eps / x0 /
v at integer t, `exact_ode_solution(sch, x_start, t_start, ...)` flows from a timestep to t = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.formulations import DDPM, Formulation, vp_alpha, vp_noise
from diffusion_jax.samplers.spec import SamplerSpec
from diffusion_jax.schedules import Schedule

Array = jax.Array


# --------------------------------------------------------------------------- any formulation


def optimal_x0(x_vp: Any, sigma: Any, mu: float, s: float) -> Any:
    """E[x0 | x_vp] at level sigma (jax; sigma a scalar or broadcastable to x_vp; inf allowed)."""
    sigma = jnp.asarray(sigma, x_vp.dtype)
    a = jax.lax.rsqrt(1.0 + jnp.square(sigma))  # 0 at sigma = inf
    sn = jnp.where(jnp.isinf(sigma), 1.0, sigma * a)
    return mu + a * s * s * (x_vp - a * mu) / (a * a * s * s + sn * sn)


def _scale(formulation: Formulation, sigma: Array) -> Array:
    """formulation.scale(sigma) (numpy float64 by contract) for a traced sigma (B,)."""
    return jax.pure_callback(
        lambda v: np.asarray(formulation.scale(np.asarray(v, np.float64)), v.dtype),
        jax.ShapeDtypeStruct(sigma.shape, sigma.dtype),
        sigma,
        vmap_method="broadcast_all",
    )


def optimal_net(formulation: Formulation, mu: float, s: float) -> Callable[[Array, Array], Array]:
    """The optimal network of `formulation` for N(mu, s^2) data: net(x (B, ...) in its own
    coordinates, time (B,)) -> formulation.target(x, sigma, x0*(x / scale(sigma); sigma)) with
    sigma = formulation.sigma_of_time(time). A learned-variance model's variance values are 0
    (the middle of Improved DDPM's range)."""
    return net_of_denoiser(formulation, lambda x_vp, sigma: optimal_x0(x_vp, sigma, mu, s))


def net_of_denoiser(
    formulation: Formulation, denoise: Callable[[Array, Array], Array]
) -> Callable[[Array, Array], Array]:
    """The network of `formulation` whose denoiser is `denoise(x_vp (B, ...), sigma (B, 1,
    ..., 1)) -> x0 (B, ...)` (in the samplers' x_vp coordinates; e.g. a `DataGaussian`'s
    `denoise(x_vp, 1 / (1 + sigma^2))`): net(x, time) -> formulation.target(x, sigma,
    denoise(x / scale(sigma), sigma)), sigma = formulation.sigma_of_time(time)."""

    def net(x: Array, time: Array) -> Array:
        sigma = jnp.asarray(formulation.sigma_of_time(time), x.dtype)
        sig = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))
        x_vp = x / _scale(formulation, sigma).reshape(sig.shape)
        out = formulation.target(x, sigma, denoise(x_vp, sig)).astype(x.dtype)
        if formulation.learned_variance:
            out = jnp.concatenate([out, jnp.zeros_like(out)], axis=-1)
        return out

    return net


def exact_flow(
    x_vp: np.ndarray, sigma_from: float, sigma_to: float, mu: float, s: float
) -> np.ndarray:
    """float64: the exact probability-flow map of x_vp from level sigma_from to sigma_to (either
    may be inf, pure noise)."""
    a_from, a_to = float(vp_alpha(sigma_from)), float(vp_alpha(sigma_to))
    sn_from, sn_to = float(vp_noise(sigma_from)), float(vp_noise(sigma_to))
    var_from = a_from**2 * s**2 + sn_from**2
    var_to = a_to**2 * s**2 + sn_to**2
    x = np.asarray(x_vp, np.float64)
    return a_to * mu + math.sqrt(var_to / var_from) * (x - a_from * mu)


def exact_solution(
    x_vp: np.ndarray, sigma_from: float, sigma_to: float, mu: float, s: float
) -> np.ndarray:
    """float64: `exact_flow` from sigma_from to sigma_to, then x0*(., sigma_to), as every
    sampler ends (its x0 prediction at the grid's last level)."""
    x = exact_flow(x_vp, sigma_from, sigma_to, mu, s)
    a, sn = float(vp_alpha(sigma_to)), float(vp_noise(sigma_to))
    return mu + a * s**2 * (x - a * mu) / (a**2 * s**2 + sn**2)


def spec_ode_error(
    spec: SamplerSpec,
    formulation: Formulation,
    x_start: np.ndarray,
    mu: float,
    s: float,
    *,
    rng: Array | None = None,
    net: Callable[[Array, Array], Array] | None = None,
    **inputs: Any,
) -> float:
    """Max abs error of `spec` with `optimal_net` (or `net`) started at x_start (x_vp
    coordinates, at the spec's first grid level) against `exact_solution` from the grid's first
    level to its last. clip_x0 is turned off; inputs go to `SamplerSpec.sample` (not x_init)."""
    spec = spec.replace(clip_x0=False)
    sigmas = spec.grid(formulation)
    x_vp = np.asarray(x_start, np.float64)
    x_init = x_vp * float(formulation.scale(sigmas[0]))
    out = spec.sample(
        optimal_net(formulation, mu, s) if net is None else net,
        formulation,
        x_vp.shape,
        jax.random.key(0) if rng is None else rng,
        x_init=jnp.asarray(x_init, diffusion.float_dtype()),
        **inputs,
    )
    reference = exact_solution(x_vp, float(sigmas[0]), float(sigmas[-1]), mu, s)
    return float(np.max(np.abs(np.asarray(out, np.float64) - reference)))


# --------------------------------------------------------------------------- ddpm schedules


def optimal_model(
    sch: Schedule | Formulation, mu: float, s: float, prediction: str = "eps"
) -> Callable[[Array, Array], Array]:
    """The optimal `model_fn(x_t (B, ...), t (B,)) -> (B, ...)` of a ddpm schedule, outputting
    `prediction`; given a `Formulation`, its `optimal_net` (prediction is then the
    formulation's own)."""
    if isinstance(sch, Formulation):
        return optimal_net(sch, mu, s)

    def model_fn(x_t: Array, t: Array) -> Array:
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
    sampler: str | SamplerSpec,
    num_steps: int | None,
    process: Schedule | Formulation,
    x_start: np.ndarray,
    mu: float,
    s: float,
    **kwargs: Any,
) -> float:
    """Max abs error of a deterministic sampler with the optimal model from x_start (x_vp
    coordinates: x_t for a schedule; clip_x0 off) against the exact solution from its grid's
    first level (T - 1 on 'linspace'; a sigma spacing may start below it) to its last, followed
    by the x0 prediction there.

    sampler: a name, or a `SamplerSpec` (then num_steps, if not None, replaces its own).
    process: a `Formulation`, or a ddpm `Schedule` with kwargs' `prediction` (default 'eps',
    the optimal model outputs it) and `learn_sigma`. kwargs: spec fields and the sampler's
    options (as `samplers.sample` takes them; other samplers' options are dropped), plus rng.
    """
    rng = kwargs.pop("rng", jax.random.key(0))
    if isinstance(process, Schedule):
        formulation: Formulation = DDPM(
            process,
            prediction=kwargs.pop("prediction", "eps"),
            learn_sigma=kwargs.pop("learn_sigma", False),
        )
    else:
        formulation = process
    spec = sampler if isinstance(sampler, SamplerSpec) else SamplerSpec(sampler=sampler)
    if num_steps is not None:
        kwargs["num_steps"] = num_steps
    spec = spec.choose(**kwargs)
    net = None
    if isinstance(process, Schedule) and not formulation.learned_variance:
        # The schedule's own closed form (float32 as in earlier releases).
        net = optimal_model(process, mu, s, getattr(formulation, "prediction", "eps"))
    return spec_ode_error(spec, formulation, x_start, mu, s, rng=rng, net=net)
