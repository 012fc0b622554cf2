"""Noise schedules: betas and every derived coefficient, precomputed in float64 numpy.

Conventions (Ho et al. 2020): timesteps are indexed t = 0..T-1, t = 0 the least noisy;
    q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I),
    ab_t = alphas_cumprod[t] = prod_{s <= t} (1 - beta_s).
"Before t = 0" is clean data: alphas_cumprod_prev[0] = 1.

All fields of `Schedule` are float64 numpy arrays of shape (T,). Coefficients are computed once,
in float64, and only cast (to float32 unless JAX x64 is enabled) when gathered by
`diffusion.extract`; e.g. 1 - ab_t near t = 0 loses most of its digits if formed in float32.

New schedules are added with `register_schedule`:

    @register_schedule("sqrt_linear")
    def _sqrt_linear(num_timesteps: int) -> np.ndarray:
        return ...  # float64 (T,) betas in (0, 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import numpy as np

BetasFn = Callable[[int], np.ndarray]

_REGISTRY: dict[str, BetasFn] = {}

# Betas are capped here (Nichol & Dhariwal): beta -> 1 makes ab_t -> 0 and 1/sqrt(ab_t) blow up.
MAX_BETA = 0.999


@flax.struct.dataclass
class Schedule:
    """A diffusion noise schedule; a pytree whose leaves are float64 numpy arrays of shape (T,).

    Pass it to jitted functions closed over (the arrays stay float64 constants) or as an argument
    (they become traced arrays of JAX's default float dtype).
    """

    betas: np.ndarray
    alphas: np.ndarray  # 1 - betas
    alphas_cumprod: np.ndarray  # ab_t
    alphas_cumprod_prev: np.ndarray  # ab_{t-1}, with ab_{-1} = 1 (clean data)
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray  # 1 / sqrt(ab_t)
    sqrt_recipm1_alphas_cumprod: np.ndarray  # sqrt(1 / ab_t - 1)
    posterior_variance: np.ndarray  # Var[x_{t-1} | x_t, x_0] = beta_t (1 - ab_{t-1}) / (1 - ab_t)
    posterior_log_variance_clipped: np.ndarray  # log of it, entry 0 (variance 0) set to entry 1
    posterior_mean_coef1: np.ndarray  # on x_0: beta_t sqrt(ab_{t-1}) / (1 - ab_t)
    posterior_mean_coef2: np.ndarray  # on x_t: (1 - ab_{t-1}) sqrt(alpha_t) / (1 - ab_t)
    large_variance: np.ndarray  # Ho's 'fixedlarge': betas with entry 0 set to posterior_variance[1]
    large_log_variance: np.ndarray  # log(large_variance)
    log_snr: np.ndarray  # log(ab_t / (1 - ab_t))

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return int(self.betas.shape[0])


def schedule_from_betas(betas: np.ndarray) -> Schedule:
    """Build a `Schedule` (all coefficients in float64) from betas: (T,) with 0 < beta < 1.

    Raises ValueError for betas that are not a finite 1-D array in (0, 1).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty 1-D array; got shape {betas.shape}")
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0.0) or np.any(betas >= 1.0):
        raise ValueError(
            f"betas must lie in (0, 1); got min {betas.min()!r}, max {betas.max()!r} "
            f"(cap them, e.g. at {MAX_BETA})"
        )
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    # 1 - ab_t formed as 1 - (1 - 1e-4) keeps only ~12 digits near t = 0; expm1 keeps all.
    one_minus_ab = -np.expm1(np.cumsum(np.log1p(-betas)))
    one_minus_ab_prev = np.append(0.0, one_minus_ab[:-1])
    posterior_variance = betas * one_minus_ab_prev / one_minus_ab
    # Entry 0 of the posterior variance is exactly 0 (x_{-1} = x_0 is known); its log is clipped
    # to entry 1 as in Ho et al. With T = 1 there is no entry 1; beta_0 is the natural stand-in.
    first = posterior_variance[1] if betas.shape[0] > 1 else betas[0]
    posterior_log_variance_clipped = np.log(np.append(first, posterior_variance[1:]))
    large_variance = np.append(first, betas[1:])
    return Schedule(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=ab,
        alphas_cumprod_prev=ab_prev,
        sqrt_alphas_cumprod=np.sqrt(ab),
        sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus_ab),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ab),
        sqrt_recipm1_alphas_cumprod=np.sqrt(one_minus_ab / ab),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(ab_prev) / one_minus_ab,
        posterior_mean_coef2=one_minus_ab_prev * np.sqrt(alphas) / one_minus_ab,
        large_variance=large_variance,
        large_log_variance=np.log(large_variance),
        log_snr=np.log(ab) - np.log(one_minus_ab),
    )


def register_schedule(name: str) -> Callable[[BetasFn], BetasFn]:
    """Decorator registering `fn(num_timesteps) -> betas` (float64 (T,)) under `name`.

    Raises ValueError if `name` is already registered.
    """

    def decorator(fn: BetasFn) -> BetasFn:
        if name in _REGISTRY:
            raise ValueError(f"schedule {name!r} is already registered; pick another name")
        _REGISTRY[name] = fn
        return fn

    return decorator


def available_schedules() -> tuple[str, ...]:
    """Names accepted by `get_schedule`, sorted."""
    return tuple(sorted(_REGISTRY))


# Zero terminal SNR leaves alpha_bar_{T-1} at most this (SNR 6e-8, as diffusers' Euler scheduler
# does) instead of exactly 0: every coefficient (1 / sqrt(ab), log-SNR, SNR loss weights) stays
# finite. Where the rescaled alpha_bar_{T-2} is already below it, half of that.
ZERO_TERMINAL_ALPHA_BAR = 2.0**-24


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, algorithm 1: shift and scale sqrt(alpha_bar) so the last timestep is pure
    noise while the first keeps its value; float64 (T,) betas. The last alpha_bar is
    min(`ZERO_TERMINAL_ALPHA_BAR`, alpha_bar_{T-2} / 2) (not 0: see there)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    ab = ((sqrt_ab - last) * first / (first - last)) ** 2
    ab[-1] = min(ZERO_TERMINAL_ALPHA_BAR, ab[-2] / 2)
    return 1.0 - ab / np.append(1.0, ab[:-1])


def get_schedule(name: str, num_timesteps: int = 1000, zero_terminal_snr: bool = False) -> Schedule:
    """The registered schedule `name` with `num_timesteps` (T >= 2 with zero_terminal_snr, else
    >= 1) steps, rescaled by `rescale_zero_terminal_snr` if `zero_terminal_snr`.

    Raises ValueError naming the registered schedules for an unknown name, or for T < 1.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown schedule {name!r}; use one of {available_schedules()}")
    if isinstance(num_timesteps, bool) or int(num_timesteps) != num_timesteps or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1; got {num_timesteps!r}")
    num_timesteps = int(num_timesteps)
    betas = np.asarray(_REGISTRY[name](num_timesteps), dtype=np.float64)
    if betas.shape != (num_timesteps,):
        raise ValueError(
            f"schedule {name!r} returned betas of shape {betas.shape}; expected ({num_timesteps},)"
        )
    if zero_terminal_snr:
        if num_timesteps < 2:
            raise ValueError("zero_terminal_snr needs num_timesteps >= 2")
        betas = rescale_zero_terminal_snr(betas)
    return schedule_from_betas(betas)


def from_config(diffusion_config: Any) -> Schedule:
    """The schedule a run's `diffusion` config section describes (schedule, num_timesteps,
    zero_terminal_snr; the last may be absent in configs saved before it existed)."""
    d = diffusion_config
    return get_schedule(
        d.schedule, d.num_timesteps, zero_terminal_snr=bool(d.get("zero_terminal_snr", False))
    )


@register_schedule("linear")
def linear_betas(num_timesteps: int) -> np.ndarray:
    """Ho et al.: betas linear from 1e-4 to 0.02 over 1000 steps, float64 (T,).

    For T != 1000 both ends are scaled by 1000 / T (Improved DDPM), which keeps ab_{T-1} close
    to the 1000-step value. For T <= 20 that would push betas to >= 1; they are capped at
    MAX_BETA (the cap is inactive for T >= 21).
    """
    scale = 1000.0 / num_timesteps
    betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    return np.minimum(betas, MAX_BETA)


def cosine_alpha_bar(u: np.ndarray, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's f(u) / f(0) with f(u) = cos^2((u + s) / (1 + s) * pi / 2), u = t / T."""

    def f(v: np.ndarray | float) -> np.ndarray:
        return np.cos((np.asarray(v, np.float64) + s) / (1.0 + s) * math.pi / 2.0) ** 2

    return f(u) / f(0.0)


@register_schedule("cosine")
def cosine_betas(num_timesteps: int) -> np.ndarray:
    """Nichol & Dhariwal: beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999), float64 (T,).

    So alphas_cumprod[t] = abar((t + 1) / T) wherever no beta was capped (index t here is
    their t + 1: our t = 0 is their first noisy step).
    """
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    abar = cosine_alpha_bar(u)
    return np.minimum(1.0 - abar[1:] / abar[:-1], MAX_BETA)
