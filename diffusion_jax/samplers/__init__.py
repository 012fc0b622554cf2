"""Samplers, each written once on the denoiser of any formulation (ddpm, edm, flow) over a grid
of noise levels, each one `lax.scan`.

    ddim (euler)        DDIM(eta): Euler on the probability-flow ODE, Euler-ancestral for
                        eta > 0 (`ddim`); N evaluations.
    ddpm                ancestral sampling; fixed_small / fixed_large / learned_range (`ddpm`); N.
    heun                EDM's Heun (Alg. 1) with churn (Alg. 2) (`heun`); 2N - 1.
    dpm_solver++        DPM-Solver++(2M), lower_order_final by default (`dpm_solver`); N.
    dpm_solver++3m      DPM-Solver++(3M) (`dpm_solver`); N.
    dpm_solver++2m_sde  DPM-Solver++(2M) SDE, stochastic (`dpm_solver`); N.
    unipc               UniPC-bh2 predictor-corrector (`unipc`); N.

A formulation (`diffusion_jax.formulations`) turns the network into D(x; sigma) and says which
levels it knows; `grid.sigma_grid` places N levels (a discrete model's rounded onto its own);
every sampler steps through them and onto sigma = 0, returning the x0 prediction at the last
level. A sampler's options are a frozen dataclass in its module; `SamplerSpec` holds the
sampler, its grid, its options and what applies to all (guidance, clipping, temperature, the
Gaussian start), and is what every mode, tool and benchmark builds once and passes around:

    spec = samplers.SamplerSpec.create(sampler='unipc', num_steps=20)
    x0 = spec.sample(model_fn, formulation, (16, 32, 32, 3), rng)

`sample(model_fn, schedule_or_formulation, shape, rng, sampler=..., **options)` does the same
from flat keywords. Noise: sample i uses key_i = fold_in(rng, sample_ids[i]); the start from
fold_in(key_i, 0) and the noise injected at step k from fold_in(key_i, k + 1), so sample i does
not depend on the batch it is drawn in, nor on how a run is split over devices.

Samplers are registered by name (`registry`), with aliases ('euler' for 'ddim'; the edm_* names
of earlier releases). Adding a sampler is one module calling `register`, and its tests.
To compile everything, jit a function that closes over model_fn and the formulation, passing
parameters as arguments.
"""

from __future__ import annotations

# The built-in samplers register themselves on import, in this (registry) order.
# isort: off
from diffusion_jax.samplers import ddpm as ddpm
from diffusion_jax.samplers import ddim as ddim
from diffusion_jax.samplers import dpm_solver as dpm_solver
from diffusion_jax.samplers import heun as heun
from diffusion_jax.samplers import unipc as unipc

# isort: on
from diffusion_jax.samplers.base import Chain, Denoiser, Level, Sampler, Scan
from diffusion_jax.samplers.driver import Trajectory, prior_sigma, run
from diffusion_jax.samplers.grid import SPACINGS, sigma_grid
from diffusion_jax.samplers.keywords import sample, spec_from_keywords, start_timestep_sigma
from diffusion_jax.samplers.registry import (
    all_names,
    canonical_name,
    get_sampler,
    names,
    register,
    unregister,
)
from diffusion_jax.samplers.spacing import TIMESTEP_SPACINGS, get_timesteps
from diffusion_jax.samplers.spec import (
    SamplerSpec,
    check_options,
    choice_names,
    default_spacing,
)

# The built-in samplers; `names()` also lists samplers registered later.
SAMPLERS = names()

__all__ = [
    "SAMPLERS",
    "SPACINGS",
    "TIMESTEP_SPACINGS",
    "Chain",
    "Denoiser",
    "Level",
    "Sampler",
    "SamplerSpec",
    "Scan",
    "Trajectory",
    "all_names",
    "canonical_name",
    "check_options",
    "choice_names",
    "default_spacing",
    "get_sampler",
    "get_timesteps",
    "names",
    "prior_sigma",
    "register",
    "run",
    "sample",
    "sigma_grid",
    "spec_from_keywords",
    "start_timestep_sigma",
    "unregister",
]
