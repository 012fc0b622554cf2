"""`sample`: a `SamplerSpec` run from flat keyword arguments, with a schedule standing for the
ddpm formulation (the form most tests, docs and notebooks use)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from diffusion_jax.formulations import Formulation, as_formulation
from diffusion_jax.samplers.driver import run
from diffusion_jax.samplers.spec import SamplerSpec
from diffusion_jax.schedules import Schedule
from diffusion_jax.values import is_int

Array = jax.Array


# `sample` arguments that are per call, not sampling choices.
_INPUTS = ("labels", "guide_fn", "sample_ids", "x_init", "return_trajectory", "data_gaussian")


def sample(
    model_fn: Callable[..., Array],
    process: Formulation | Schedule,
    shape: tuple[int, ...],
    rng: Array,
    *,
    prediction: str = "eps",
    learn_sigma: bool = False,
    start_timestep: int | None = None,
    **choices: Any,
) -> Any:
    """`run` from flat keywords: `SamplerSpec` fields and the chosen sampler's options
    (sampler, num_steps, eta, timestep_spacing, guidance_scale, ...; options of other
    samplers are accepted and ignored), plus the per-call inputs of `run`.

    process: a `Formulation`, or a `schedules.Schedule` for the ddpm formulation with
    `prediction` and `learn_sigma` (then model_fn(x_t, t int32 (B,)[, labels])).
    start_timestep: a ddpm chain started at this timestep (SDEdit: pass x_init = q_sample(x0,
    start_timestep)), its N timesteps spaced over [start_timestep, 0].
    """
    formulation = as_formulation(process, prediction, learn_sigma)
    inputs = {k: choices.pop(k) for k in _INPUTS if k in choices}
    spec = spec_from_keywords(**choices)
    start_sigma = None
    if start_timestep is not None:
        start_sigma = start_timestep_sigma(formulation, start_timestep, spec.num_steps)
    return run(spec, model_fn, formulation, shape, rng, start_sigma=start_sigma, **inputs)


def spec_from_keywords(**choices: Any) -> SamplerSpec:
    """A `SamplerSpec` from flat keywords (`SamplerSpec.choose`)."""
    return SamplerSpec().choose(**choices)


def start_timestep_sigma(formulation: Formulation, start_timestep: Any, num_steps: Any) -> float:
    levels = formulation.levels
    if levels is None:
        raise ValueError(
            f"start_timestep is a timestep of a discrete schedule; the {formulation.name} "
            "formulation starts part-way at a level: pass start_sigma to SamplerSpec.sample"
        )
    if not is_int(start_timestep) or not 0 <= start_timestep < len(levels):
        raise ValueError(
            f"start_timestep must be an integer in [0, {len(levels) - 1}]; got {start_timestep!r}"
        )
    if is_int(num_steps) and num_steps > start_timestep + 1:
        raise ValueError(
            f"num_steps={num_steps} exceeds the {start_timestep + 1} timesteps from "
            f"start_timestep={start_timestep} to 0; lower num_steps"
        )
    return float(levels[start_timestep])
