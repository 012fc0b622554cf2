"""The noise levels a sampler visits, for any formulation: `sigma_grid`.

A grid is N levels sigma_0 > ... > sigma_{N-1} > 0; every sampler then steps onto sigma = 0.

A discrete formulation (ddpm) visits N of its T levels, chosen by `spacing.get_timesteps`:
uniform in the timestep ('linspace', 'leading', 'trailing', 'quadratic') or the levels nearest
Karras' or the log-uniform sigmas ('karras', 'logsnr', from min(sigma_max, top level) down to
the lowest level). A continuous formulation (edm, flow) takes the levels themselves:

    'karras'     Karras et al.'s rho-spaced sigmas from sigma_max to sigma_min
    'logsnr'     geometric from sigma_max to sigma_min
    'linspace'   uniform along its own time axis (`Formulation.spacing_sigma`): u_k = 1 - k/N,
                 k = 0..N-1, from its top (flow: t = 1, pure noise; edm: sigma_max) and
                 stopping one interval above clean data (SD3's flow grid)
    'quadratic'  u_k = (1 - k/N)^2, denser near the data

'leading' and 'trailing' are timestep conventions of discrete schedules only. A chain started
part-way (SDEdit, the Gaussian start) spaces its levels from `start_sigma` instead of the top.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_jax.formulations import Formulation
from diffusion_jax.formulations.base import nearest_level
from diffusion_jax.samplers import spacing
from diffusion_jax.values import is_int

SPACINGS = spacing.TIMESTEP_SPACINGS
DISCRETE_ONLY_SPACINGS = ("leading", "trailing")


def check_spacing(formulation: Formulation, spacing_name: Any) -> None:
    """ValueError naming the choices unless `spacing_name` places levels for `formulation`."""
    if spacing_name not in SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing_name!r}; use one of {SPACINGS}")
    if formulation.levels is None and spacing_name in DISCRETE_ONLY_SPACINGS:
        allowed = tuple(s for s in SPACINGS if s not in DISCRETE_ONLY_SPACINGS)
        raise ValueError(
            f"timestep_spacing={spacing_name!r} picks timesteps of a discrete schedule; the "
            f"{formulation.name} formulation is continuous: use one of {allowed}"
        )


def sigma_grid(
    formulation: Formulation,
    num_steps: int,
    spacing_name: str,
    *,
    sigma_min: float = spacing.SIGMA_MIN,
    sigma_max: float = spacing.SIGMA_MAX,
    rho: float = spacing.RHO,
    start_sigma: float | None = None,
) -> np.ndarray:
    """float64 (N,) decreasing levels (see the module docstring); start_sigma: the level a
    chain started part-way begins at (rounded onto a discrete model's levels)."""
    check_spacing(formulation, spacing_name)
    if not is_int(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
    levels = formulation.levels
    if levels is not None:
        length = len(levels)
        if start_sigma is not None:
            length = int(nearest_level(levels, np.asarray([start_sigma]))[0]) + 1
        timesteps = spacing.get_timesteps(
            length,
            num_steps,
            spacing_name,
            sigma_max=sigma_max,
            rho=rho,
            level_sigmas=levels[:length],
        )
        return np.asarray(levels[timesteps], np.float64)
    return _continuous_grid(
        formulation, num_steps, spacing_name, sigma_min, sigma_max, rho, start_sigma
    )


def _continuous_grid(
    formulation: Formulation,
    n: int,
    spacing_name: str,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    start_sigma: float | None,
) -> np.ndarray:
    spacing.check_sigma_range(sigma_min, sigma_max, rho)
    if spacing_name in spacing.SIGMA_SPACINGS:
        hi = float(sigma_max) if start_sigma is None else float(start_sigma)
        if n == 1 or hi <= sigma_min:
            return np.full(n, hi)
        if spacing_name == "karras":
            return spacing.karras_sigmas(n, sigma_min, hi, rho)
        return spacing.log_sigmas(n, sigma_min, hi)
    top = 1.0
    if start_sigma is not None:
        top = float(_position_of(formulation, float(start_sigma), float(sigma_max)))
    frac = 1.0 - np.arange(n) / n
    u = top * (frac if spacing_name == "linspace" else frac**2)
    return np.asarray(formulation.spacing_sigma(u, sigma_max), np.float64)


def _position_of(formulation: Formulation, sigma: float, sigma_max: float) -> float:
    """The position u in [0, 1] of `sigma` on the formulation's time axis (bisection on the
    increasing `spacing_sigma`)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if formulation.spacing_sigma(np.asarray([mid]), sigma_max)[0] < sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
