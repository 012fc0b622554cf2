"""Timestep spacings: which N of the schedule's T integer timesteps a sampler visits.

Uniform in t ('linspace', 'leading', 'trailing', 'quadratic') or in sigma ('karras', 'logsnr'),
sigma = sqrt((1 - ab_t) / ab_t) the noise level of x_t / sqrt(ab_t) (EDM's sigma). The sigma
spacings are mapped onto the nearest integer timesteps (in log sigma), not interpolated between
them as diffusers' `use_karras_sigmas` does: the network was trained at integer t only, and every
solver coefficient then comes from the schedule's exact values at the timesteps visited. With
T = 1000 the nearest timestep is within half a step of the target; near t = 0 the schedule's
own steps are coarse (sigma doubles from t = 0 to 1 on 'cosine'), so dense targets there collide
and are pushed apart to distinct timesteps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion_jax.formulations.base import nearest_level
from diffusion_jax.values import is_int, is_real

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing", "quadratic", "karras", "logsnr")
# Spaced in sigma: they need the schedule's alphas_cumprod, sigma_max and (karras) rho.
SIGMA_SPACINGS = ("karras", "logsnr")
# Karras et al.'s noise-level grid: sigma from SIGMA_MAX down to SIGMA_MIN with exponent RHO.
# The default of every signature and SamplerSpec field that takes them.
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    """Karras et al. 2022, eq. 5: float64 (N,), sigma_max down to sigma_min,
    (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho; N = 1 gives
    [sigma_max]."""
    check_sigma_range(sigma_min, sigma_max, rho)
    if num_steps == 1:
        return np.array([float(sigma_max)])
    u = np.linspace(0.0, 1.0, num_steps)
    lo, hi = float(sigma_min) ** (1.0 / rho), float(sigma_max) ** (1.0 / rho)
    return (hi + u * (lo - hi)) ** rho


def log_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """float64 (N,) geometric from sigma_max to sigma_min (uniform in log-SNR)."""
    check_sigma_range(sigma_min, sigma_max, RHO)
    if num_steps == 1:
        return np.array([float(sigma_max)])
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_steps))


def check_sigma_range(sigma_min: Any, sigma_max: Any, rho: Any) -> None:
    """ValueError naming the fix unless 0 < sigma_min < sigma_max < inf and rho > 0."""
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        if not is_real(value) or not 0.0 < value < np.inf:
            raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    if not sigma_min < sigma_max:
        raise ValueError(
            f"sigma_min={sigma_min!r} must be below sigma_max={sigma_max!r} (EDM: 0.002 and 80)"
        )


def validate_timesteps(
    num_timesteps: int,
    num_steps: int,
    spacing: str = "linspace",
    *,
    sigma_max: Any = SIGMA_MAX,
    rho: Any = RHO,
) -> None:
    """Raise ValueError naming the allowed values for a bad spacing, T, N, sigma_max or rho."""
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; use one of {TIMESTEP_SPACINGS}")
    if not is_int(num_timesteps) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1; got {num_timesteps!r}")
    if not is_int(num_steps) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must be an integer in [1, {num_timesteps}] (the schedule's T); "
            f"got {num_steps!r}"
        )
    if not is_real(sigma_max) or not 0.0 < sigma_max < np.inf:
        raise ValueError(f"sigma_max must be a finite number > 0 (EDM: 80); got {sigma_max!r}")
    if not is_real(rho) or not 0.0 < rho < np.inf:
        raise ValueError(f"rho must be a finite number > 0 (EDM: 7); got {rho!r}")


def _fix_strictly_decreasing(timesteps: np.ndarray, num_timesteps: int) -> np.ndarray:
    """Make rounded timesteps (N,) unique and strictly decreasing within [0, T-1], moving as
    few as needed; a no-op on sequences that already are (N <= T guarantees a solution)."""
    asc = np.clip(timesteps[::-1].astype(np.int64), 0, num_timesteps - 1)
    for k in range(1, len(asc)):
        asc[k] = max(asc[k], asc[k - 1] + 1)
    asc[-1] = min(asc[-1], num_timesteps - 1)
    for k in range(len(asc) - 2, -1, -1):
        asc[k] = min(asc[k], asc[k + 1] - 1)
    return asc[::-1].copy()


def sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - ab_t) / ab_t), float64 (T,), increasing in t."""
    ab = np.asarray(alphas_cumprod, np.float64)
    return np.sqrt((1.0 - ab) / ab)


def _sigma_targets(
    sigma: np.ndarray, num_steps: int, spacing: str, sigma_max: float, rho: float
) -> np.ndarray:
    """N target sigmas, decreasing from min(sigma_max, sigma(T-1)) to sigma(0)."""
    hi, lo = min(float(sigma_max), float(sigma[-1])), float(sigma[0])
    hi = max(hi, lo)
    if num_steps == 1 or hi == lo:
        return np.full(num_steps, hi)
    if spacing == "karras":
        return karras_sigmas(num_steps, lo, hi, rho)
    return log_sigmas(num_steps, lo, hi)  # logsnr: uniform in log sigma


def get_timesteps(
    num_timesteps: int,
    num_steps: int,
    spacing: str = "linspace",
    *,
    alphas_cumprod: np.ndarray | None = None,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    level_sigmas: np.ndarray | None = None,
) -> np.ndarray:
    """The N = num_steps integer timesteps a sampler visits: int64 (N,), strictly decreasing.

    After the last one every sampler steps to clean data (its x0 prediction there). With
    T = num_timesteps:
      'linspace'  round(linspace(T - 1, 0, N))
      'leading'   k * (T // N) for k = N-1..0 (DDIM's 'uniform'; starts below T - 1)
      'trailing'  round(T - k T / N) - 1 for k = 0..N-1 (Lin et al. 2024, table 2: starts at
                  T - 1 and ends at T / N - 1, e.g. 999, 899, ..., 99 for N = 10)
      'quadratic' round((T - 1) (k / (N - 1))^2) for k = N-1..0 (DDIM's 'quad', dense near 0)
      'karras'    the timesteps nearest (in log sigma) to Karras et al.'s
                  (s_hi^(1/rho) + k/(N-1) (s_lo^(1/rho) - s_hi^(1/rho)))^rho, k = 0..N-1, with
                  s_hi = min(sigma_max, sigma_{T-1}) and s_lo = sigma_0 (the schedule's
                  smallest; EDM's 0.002 is below it on every 1000-step schedule)
      'logsnr'    the same with sigma geometric from s_hi to s_lo (uniform in log-SNR, DPM-
                  Solver's recommendation)
    All but 'leading' and 'trailing' end at t = 0. With sigma_max < sigma_{T-1} the sigma
    spacings start below T - 1, still from x ~ N(0, I) (as EDM samples VP models: at sigma 80
    the data's share of x_t's variance is 1/6400). N = 1 gives the first timestep only (one
    jump to the x0 prediction). Collisions from rounding are pushed apart. The sigma spacings
    need alphas_cumprod (T,), or the levels' sigmas (T,) as level_sigmas.
    """
    validate_timesteps(num_timesteps, num_steps, spacing, sigma_max=sigma_max, rho=rho)
    t_max, n = num_timesteps - 1, num_steps
    ts: np.ndarray
    if spacing in SIGMA_SPACINGS:
        if level_sigmas is not None:
            sigma = np.asarray(level_sigmas, np.float64)[:num_timesteps]
        elif alphas_cumprod is None or np.shape(alphas_cumprod) != (num_timesteps,):
            raise ValueError(
                f"timestep_spacing={spacing!r} needs the schedule's alphas_cumprod "
                f"({num_timesteps},)"
            )
        else:
            sigma = sigmas(alphas_cumprod)
        ts = nearest_level(sigma, _sigma_targets(sigma, n, spacing, sigma_max, rho))
        return _fix_strictly_decreasing(ts[:1] if n == 1 else ts, num_timesteps)
    if n == 1:
        return np.array([t_max], dtype=np.int64)
    if spacing == "linspace":
        ts = np.round(np.linspace(t_max, 0.0, n))
    elif spacing == "leading":
        ts = np.arange(n - 1, -1, -1) * (num_timesteps // n)
    elif spacing == "trailing":
        ts = np.round(num_timesteps - np.arange(n) * (num_timesteps / n)) - 1
    else:  # quadratic
        ts = np.round(t_max * np.linspace(1.0, 0.0, n) ** 2)
    return _fix_strictly_decreasing(np.asarray(ts), num_timesteps)
