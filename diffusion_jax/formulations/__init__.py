"""Formulations: what a diffusion model is, as every sampler, loss and tool needs it
(`base.Formulation`; one module each).

    ddpm   discrete variance-preserving chain on a schedule; eps / x0 / v, learned variance
    edm    Karras et al. 2022: continuous sigma, preconditioned denoiser
    flow   flow matching / rectified flow: x_t = (1 - t) x0 + t n, velocity target

    from diffusion_jax import formulations, schedules
    f = formulations.DDPM(schedules.get_schedule('cosine'), prediction='eps')
    f = formulations.EDM(sigma_data=0.5)
    f = formulations.Flow(time_sampling='logit_normal', shift=1.0)

Nothing outside these modules asks which formulation a model is: it asks the formulation.
"""

from __future__ import annotations

from diffusion_jax.formulations.base import Formulation, vp_alpha, vp_noise
from diffusion_jax.formulations.ddpm import DDPM, as_formulation
from diffusion_jax.formulations.edm import EDM
from diffusion_jax.formulations.flow import Flow

FORMULATIONS = ("ddpm", "edm", "flow")

__all__ = [
    "DDPM",
    "EDM",
    "FORMULATIONS",
    "Flow",
    "Formulation",
    "as_formulation",
    "vp_alpha",
    "vp_noise",
]
