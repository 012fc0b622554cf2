"""Sampler argument checks, asked of the registry: a sampler's name, minimum steps, options and
schedule checks come from its registration, so no check here names a sampler."""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_jax import diffusion, edm
from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import Option, SamplerOptions
from diffusion_jax.samplers.spacing import get_timesteps, validate_timesteps
from diffusion_jax.schedules import Schedule
from diffusion_jax.values import is_int, is_real


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
    sigma_max: Any = edm.SIGMA_MAX,
    rho: Any = edm.RHO,
    gaussian_start_t: Any = 0,
    sigma_min: Any = edm.SIGMA_MIN,
    s_churn: Any = 0.0,
    s_min: Any = 0.0,
    s_max: Any = float("inf"),
    s_noise: Any = 1.0,
    formulation: str = "ddpm",
) -> SamplerOptions:
    """Raise ValueError naming the allowed values / the fix for any bad sampler option; return
    the checked options the samplers read. formulation: the model's, 'ddpm' or 'edm'; a
    sampler registered for the other is refused (num_timesteps is then unused)."""
    chosen = registry.get_sampler(sampler)
    if formulation not in edm.FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; use one of {edm.FORMULATIONS}")
    if chosen.formulation != formulation:
        raise ValueError(
            f"sampler {sampler!r} samples the {chosen.formulation!r} formulation; this model is "
            f"{formulation!r}: use one of {registry.names(formulation)}"
        )
    if prediction not in diffusion.PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; use one of {diffusion.PREDICTIONS}")
    options = SamplerOptions(
        eta=eta,
        variance=variance,
        lower_order_final=lower_order_final,
        temperature=temperature,
        learn_sigma=learn_sigma,
        s_churn=s_churn,
        s_min=s_min,
        s_max=s_max,
        s_noise=s_noise,
    )
    if formulation == "edm":
        _validate_edm_args(
            sampler,
            chosen.min_steps,
            num_steps,
            timestep_spacing,
            (sigma_min, sigma_max, rho),
            gaussian_start_t,
            options,
        )
        return options
    validate_timesteps(num_timesteps, num_steps, timestep_spacing, sigma_max=sigma_max, rho=rho)
    if not is_int(gaussian_start_t) or not 0 <= gaussian_start_t < num_timesteps:
        raise ValueError(
            f"gaussian_start_t must be an integer in [0, {num_timesteps - 1}] (0 = off); "
            f"got {gaussian_start_t!r}"
        )
    if num_steps < chosen.min_steps:
        what = " integrates the ODE from t=T-1 to t=0 and" if chosen.ode else ""
        raise ValueError(
            f"sampler {sampler!r}{what} needs num_steps >= {chosen.min_steps} "
            f"(and a schedule with T >= {chosen.min_steps}); got num_steps={num_steps}"
        )
    _check_declared_options(options)
    return options


# The sigma grids of the edm samplers (`edm.karras_sigmas`, `edm.log_sigmas`).
EDM_SPACINGS = ("karras", "logsnr")


def _validate_edm_args(
    sampler: str,
    min_steps: int,
    num_steps: Any,
    spacing: str,
    sigma_range: tuple[Any, Any, Any],
    gaussian_start_t: Any,
    options: SamplerOptions,
) -> None:
    """The checks of an edm sampler's arguments; sigma_range: (sigma_min, sigma_max, rho)."""
    if not is_int(num_steps) or num_steps < min_steps:
        raise ValueError(
            f"sampler {sampler!r} needs an integer num_steps >= {min_steps}; got {num_steps!r}"
        )
    if spacing not in EDM_SPACINGS:
        raise ValueError(
            f"sampler {sampler!r} places its noise levels with timestep_spacing in "
            f"{EDM_SPACINGS} (EDM: 'karras'); got {spacing!r}"
        )
    edm.check_sigma_range(*sigma_range)
    if gaussian_start_t:
        raise ValueError("gaussian_start_t is for the ddpm formulation's samplers; leave it 0")
    if options.learn_sigma:
        raise ValueError("an edm model has no learned variance; learn_sigma must be False")
    _check_declared_options(options)


def _check_declared_options(options: SamplerOptions) -> None:
    temperature = options.temperature
    # Every registered sampler's options, not only the chosen one's: `sample` takes them all.
    declared: list[Option] = []
    for registered in registry.registered():
        declared += [o for o in registered.options if o not in declared]
    for option in declared:
        if option.check is not None:
            option.check(getattr(options, option.name), options)
    if is_real(temperature) and not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0; got {temperature!r}")


def check_gaussian_start_steps(num_steps: int, gaussian_start_t: int) -> None:
    """ValueError unless the N timesteps fit between gaussian_start_t (> 0: on) and 0."""
    if gaussian_start_t and num_steps > gaussian_start_t + 1:
        raise ValueError(
            f"num_steps={num_steps} exceeds the {gaussian_start_t + 1} timesteps from "
            f"gaussian_start_t={gaussian_start_t} to 0; lower num_steps or raise gaussian_start_t"
        )


def validate_on_schedule(
    sch: Schedule | edm.EDM,
    *,
    sampler: str,
    num_steps: int,
    eta: float,
    timestep_spacing: str = "linspace",
    variance: str = "fixed_small",
    lower_order_final: bool = True,
    sigma_max: float = edm.SIGMA_MAX,
    rho: float = edm.RHO,
    gaussian_start_t: int = 0,
) -> None:
    """The checks that need the schedule's values (pure numpy, nothing traced), e.g. a DDIM
    `eta` whose noise would exceed 1 - alpha_bar on the chosen timesteps raises ValueError.
    An `edm.EDM` (the edm formulation) has no such checks."""
    if isinstance(sch, edm.EDM):
        return
    check_gaussian_start_steps(num_steps, gaussian_start_t)
    check = registry.get_sampler(sampler).check_on_schedule
    if check is None:
        return
    chain_length = gaussian_start_t + 1 if gaussian_start_t else sch.num_timesteps
    ab = np.asarray(sch.alphas_cumprod)[:chain_length]
    timesteps = get_timesteps(
        chain_length, num_steps, timestep_spacing, alphas_cumprod=ab, sigma_max=sigma_max, rho=rho
    )
    options = SamplerOptions(eta=eta, variance=variance, lower_order_final=lower_order_final)
    check(ab[timesteps], options)
