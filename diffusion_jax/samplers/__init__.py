"""Samplers: ancestral DDPM, DDIM(eta), DPM-Solver++ (2M, 3M, 2M SDE) and Heun, each one
`lax.scan`.

One entry point, `sample(model_fn, sch, shape, rng, sampler=..., ...)`. A sampler visits
N = num_steps integer timesteps tau_0 > tau_1 > ... > tau_{N-1} (`get_timesteps`: uniform in t,
or in sigma with 'karras' and 'logsnr'; all but 'leading' and 'trailing' end at 0) and
evaluates the model only there, inside one scan body (compile time does not grow with N).

    ddpm                ancestral sampling on the respaced chain (`ddpm`); N evaluations.
    ddim                DDIM(eta) (`ddim`); N evaluations.
    dpm_solver++        DPM-Solver++(2M), lower_order_final by default (`dpm_solver`); N.
    dpm_solver++3m      DPM-Solver++(3M) (`dpm_solver`); N evaluations.
    dpm_solver++2m_sde  DPM-Solver++(2M) SDE, stochastic (`dpm_solver`); N evaluations.
    heun                EDM's 2nd-order Heun on the probability-flow ODE (`heun`); 2N - 1.

The EDM formulation (`diffusion_jax.edm`; pass an `edm.EDM` as `sch` and the network F as
model_fn) has its own samplers in sigma space (`edm_samplers`): edm_euler (N evaluations),
edm_heun (EDM Alg. 1, 2N - 1), edm_stochastic (EDM Alg. 2, 2N - 1), edm_dpm_solver++ and
edm_dpm_solver++2m_sde (N). Each sampler is registered for one formulation; `sample` refuses
the other's.

The last step of every sampler returns the model's x0 prediction at the last timestep (DDIM's
step to ab = 1; for the ODE samplers the Euler step to sigma = 0, i.e. x0 = denoise(x there)).
`gaussian_start_t` replaces the chain above that timestep by the exact flow of the data's
Gaussian model (`diffusion_jax.data_gaussian`).

Accuracy (benchmarks/sampler_gaussian_error.py, exact Gaussian model, linspace timesteps): ddim
is first order, heun and pure 2M dpm_solver++ (lower_order_final=False) second order in the
number of steps; with few steps dpm_solver++ with lower_order_final is the most accurate, and
heun needs many steps on 'cosine'. Each module's docstring has its numbers; check the benchmark
before choosing.

Samplers are registered by name (`registry`): each sampler module registers a `Sampler` (its
scan builder, the options it reads, its checks, minimum steps and model evaluations) when
imported, and argument validation, `SamplerSpec` and the runner ask the registry. Adding a
sampler is one module calling `register` (imported below, or by its user) and its tests.

Noise: sample i uses key_i = fold_in(rng, sample_ids[i]); x_T ~ N(0, I) from fold_in(key_i, 0)
and the noise injected at step k from fold_in(key_i, k + 1). So sample i does not depend on the
batch it is drawn in, nor on how a run is split over devices.

To compile everything, jit a function that closes over `model_fn` and the schedule, passing
parameters as arguments:

    @jax.jit
    def generate(params, rng):
        model_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
        return samplers.sample(model_fn, sch, (16, 32, 32, 3), rng, sampler='ddim', num_steps=50)
"""

from __future__ import annotations

# The built-in samplers register themselves on import, in this (registry) order.
# isort: off
from diffusion_jax.samplers import ddpm as ddpm
from diffusion_jax.samplers import ddim as ddim
from diffusion_jax.samplers import dpm_solver as dpm_solver
from diffusion_jax.samplers import heun as heun
from diffusion_jax.samplers import edm_samplers as edm_samplers

# isort: on
from diffusion_jax.samplers.base import (
    Chain,
    Option,
    Sampler,
    SamplerOptions,
    Scan,
)
from diffusion_jax.samplers.checks import validate_on_schedule, validate_sampler_args
from diffusion_jax.samplers.driver import Trajectory, sample
from diffusion_jax.samplers.registry import get_sampler, names, register, unregister
from diffusion_jax.samplers.spacing import TIMESTEP_SPACINGS, get_timesteps
from diffusion_jax.samplers.spec import SamplerSpec

# The built-in samplers; `names()` also lists samplers registered later.
SAMPLERS = names()
# The built-in samplers of each formulation.
DDPM_SAMPLERS = names("ddpm")
EDM_SAMPLERS = names("edm")
# The ddpm samplers that integrate the ODE from t=T-1 to t=0 (they need num_steps >= 2).
ODE_SAMPLERS = tuple(name for name in DDPM_SAMPLERS if get_sampler(name).ode)

__all__ = [
    "DDPM_SAMPLERS",
    "EDM_SAMPLERS",
    "ODE_SAMPLERS",
    "SAMPLERS",
    "TIMESTEP_SPACINGS",
    "Chain",
    "Option",
    "Sampler",
    "SamplerOptions",
    "SamplerSpec",
    "Scan",
    "Trajectory",
    "get_sampler",
    "get_timesteps",
    "names",
    "register",
    "sample",
    "unregister",
    "validate_on_schedule",
    "validate_sampler_args",
]
