"""Sampler argument checks, asked of the registry: a sampler's name, minimum steps, options and
schedule checks come from its registration, so no check here names a sampler."""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import Option, SamplerOptions
from diffusion_jax.samplers.spacing import get_timesteps, validate_timesteps
from diffusion_jax.schedules import Schedule
from diffusion_jax.values import is_real


def validate_sampler_args(
    *,
    sampler: str,
    num_steps: int,
    num_timesteps: int,
    eta: float = 0.0,
    prediction: str = "eps",
    timestep_spacing: str = "linspace",
    variance: str = "fixed_small",
    temperature: Any = 1.0,
    learn_sigma: bool = False,
    lower_order_final: bool = True,
) -> SamplerOptions:
    """Raise ValueError naming the allowed values / the fix for any bad sampler option; return
    the checked options the samplers read."""
    chosen = registry.get_sampler(sampler)
    if prediction not in diffusion.PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; use one of {diffusion.PREDICTIONS}")
    validate_timesteps(num_timesteps, num_steps, timestep_spacing)
    if num_steps < chosen.min_steps:
        what = " integrates the ODE from t=T-1 to t=0 and" if chosen.ode else ""
        raise ValueError(
            f"sampler {sampler!r}{what} needs num_steps >= {chosen.min_steps} "
            f"(and a schedule with T >= {chosen.min_steps}); got num_steps={num_steps}"
        )
    options = SamplerOptions(
        eta=eta,
        variance=variance,
        lower_order_final=lower_order_final,
        temperature=temperature,
        learn_sigma=learn_sigma,
    )
    # Every registered sampler's options, not only the chosen one's: `sample` takes them all.
    declared: list[Option] = []
    for registered in registry.registered():
        declared += [o for o in registered.options if o not in declared]
    for option in declared:
        if option.check is not None:
            option.check(getattr(options, option.name), options)
    if is_real(temperature) and not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0; got {temperature!r}")
    return options


def validate_on_schedule(
    sch: Schedule,
    *,
    sampler: str,
    num_steps: int,
    eta: float,
    timestep_spacing: str = "linspace",
    variance: str = "fixed_small",
    lower_order_final: bool = True,
) -> None:
    """The checks that need the schedule's values (pure numpy, nothing traced), e.g. a DDIM
    `eta` whose noise would exceed 1 - alpha_bar on the chosen timesteps raises ValueError."""
    check = registry.get_sampler(sampler).check_on_schedule
    if check is None:
        return
    timesteps = get_timesteps(sch.num_timesteps, num_steps, timestep_spacing)
    options = SamplerOptions(eta=eta, variance=variance, lower_order_final=lower_order_final)
    check(np.asarray(sch.alphas_cumprod)[timesteps], options)
