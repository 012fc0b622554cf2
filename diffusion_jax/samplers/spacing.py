"""Timestep spacings: which N of the schedule's T integer timesteps a sampler visits."""

from __future__ import annotations

import numpy as np

from diffusion_jax.values import is_int

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing", "quadratic")


def validate_timesteps(num_timesteps: int, num_steps: int, spacing: str = "linspace") -> None:
    """Raise ValueError naming the allowed values for a bad spacing, T or N."""
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; use one of {TIMESTEP_SPACINGS}")
    if not is_int(num_timesteps) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1; got {num_timesteps!r}")
    if not is_int(num_steps) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must be an integer in [1, {num_timesteps}] (the schedule's T); "
            f"got {num_steps!r}"
        )


def _fix_strictly_decreasing(timesteps: np.ndarray, num_timesteps: int) -> np.ndarray:
    """Make rounded timesteps (N,) unique and strictly decreasing within [0, T-1], keeping the
    last at 0; a no-op on sequences that already are (N <= T guarantees a solution)."""
    asc = np.clip(timesteps[::-1].astype(np.int64), 0, num_timesteps - 1)
    for k in range(1, len(asc)):
        asc[k] = max(asc[k], asc[k - 1] + 1)
    asc[-1] = min(asc[-1], num_timesteps - 1)
    for k in range(len(asc) - 2, -1, -1):
        asc[k] = min(asc[k], asc[k + 1] - 1)
    return asc[::-1].copy()


def get_timesteps(num_timesteps: int, num_steps: int, spacing: str = "linspace") -> np.ndarray:
    """The N = num_steps integer timesteps a sampler visits: int64 (N,), strictly decreasing.

    Every spacing ends at t = 0 (for N >= 2); N = 1 gives [T - 1] (one jump from x_T to the
    x0 prediction). With T = num_timesteps:
      'linspace'  round(linspace(T - 1, 0, N)) (starts at T - 1)
      'leading'   k * (T // N) for k = N-1..0 (DDIM's 'uniform'; starts below T - 1)
      'trailing'  round(T - 1 - k * T / N) for k = 0..N-1, the last set to 0 (starts at T - 1)
      'quadratic' round((T - 1) * (k / (N - 1))^2) for k = N-1..0 (DDIM's 'quad', dense near 0)
    Collisions from rounding (quadratic with N close to T) are pushed apart.
    """
    validate_timesteps(num_timesteps, num_steps, spacing)
    t_max, n = num_timesteps - 1, num_steps
    if n == 1:
        return np.array([t_max], dtype=np.int64)
    ts: np.ndarray
    if spacing == "linspace":
        ts = np.round(np.linspace(t_max, 0.0, n))
    elif spacing == "leading":
        ts = np.arange(n - 1, -1, -1) * (num_timesteps // n)
    elif spacing == "trailing":
        ts = np.round(t_max - np.arange(n) * (num_timesteps / n))
        ts[-1] = 0
    else:  # quadratic
        ts = np.round(t_max * np.linspace(1.0, 0.0, n) ** 2)
    return _fix_strictly_decreasing(np.asarray(ts), num_timesteps)
