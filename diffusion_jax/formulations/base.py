"""The formulation interface: what every sampler, loss and tool asks of a formulation.

A formulation (ddpm, edm, flow) is a Gaussian path x = a(sigma) (x0 + sigma n) from the data
(sigma = 0) to noise, with sigma the noise-to-signal ratio, plus the network that denoises it.
In the coordinates x~ = x / a every formulation is the same process, x~ = x0 + sigma n, and its
denoiser D(x~; sigma) = E[x0 | x~] is what the samplers integrate (k-diffusion and EDM work the
same way). The samplers carry the state in the variance-preserving coordinates of that process,

    x_vp = x~ / sqrt(1 + sigma^2) = alpha x0 + s n,  alpha = 1 / sqrt(1 + sigma^2),
                                                     s = sigma / sqrt(1 + sigma^2),

which stay finite at sigma = inf (flow matching's t = 1: x_vp = n), where x~ does not. For the
ddpm formulation x_vp is its own x_t.

A formulation gives:
  levels            the sigmas its network was trained at: float64 (T,) increasing for a
                    discrete model (a grid is rounded onto them, `round_sigma`), None for a
                    continuous one; sigma_range: the smallest and largest it knows
  scale(sigma)      own coordinates = scale * x_vp (1 for ddpm, sqrt(1 + sigma^2) for edm)
  time(sigma)       the network's time input at those levels (ddpm: the integer timestep)
  denoise           D from the network's output at own-coordinate x and level
  start_std         the std of its start distribution N(0, start_std^2) in own coordinates
  training_loss     its target, loss weight and noise-level sampler
  spacing_time      the axis its 'linspace' / 'quadratic' grids are uniform in
  capabilities      learned variances, a discrete variational bound (bits/dim)

Everything is pure: numpy (float64) for the per-level numbers a sampler computes before
tracing, jax for the network side. Nothing here reads a config.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# net(x (B, ...) in the formulation's own coordinates, time (B,)) -> network output; labels
# already bound (`guidance.bind`).
Net = Callable[[Array, Array], Array]


def vp_alpha(sigma: Any) -> Any:
    """alpha = 1 / sqrt(1 + sigma^2) (numpy, float64; 0 at sigma = inf)."""
    sigma = np.asarray(sigma, np.float64)
    with np.errstate(over="ignore"):
        return 1.0 / np.sqrt(1.0 + np.square(sigma))


def vp_noise(sigma: Any) -> Any:
    """s = sigma / sqrt(1 + sigma^2) (numpy, float64; 1 at sigma = inf)."""
    sigma = np.asarray(sigma, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        s = sigma / np.sqrt(1.0 + np.square(sigma))
    return np.where(np.isinf(sigma), 1.0, s)


class Formulation(abc.ABC):
    """A diffusion formulation; see the module docstring. Subclasses are frozen dataclasses
    (hashable: samplers close over them as static values)."""

    name: ClassVar[str]
    # Has a discrete-time variational bound (`likelihood.bits_per_dim`)?
    has_discrete_vlb: ClassVar[bool] = False
    # The samplers' grid unless a sampler or the user picks another (`samplers.grid`).
    default_spacing: ClassVar[str] = "linspace"

    @property
    def learned_variance(self) -> bool:
        """Does the network output a per-pixel variance (Improved DDPM's learned range)?"""
        return False

    @property
    def levels(self) -> np.ndarray | None:
        """float64 (T,) increasing sigmas of a discrete model; None when continuous."""
        return None

    @property
    @abc.abstractmethod
    def sigma_range(self) -> tuple[float, float]:
        """(smallest, largest) sigma the network knows; the largest may be inf."""

    def round_sigma(self, sigma: Any) -> np.ndarray:
        """float64 sigmas as the network can take them: a discrete model's nearest levels (in
        log sigma; 0 stays 0), a continuous model's unchanged."""
        sigma = np.asarray(sigma, np.float64)
        levels = self.levels
        if levels is None:
            return sigma
        return np.where(sigma > 0, levels[nearest_level(levels, sigma)], 0.0)

    @abc.abstractmethod
    def scale(self, sigma: Any) -> np.ndarray:
        """float64: own coordinates = scale(sigma) * x_vp (finite wherever sigma is a level)."""

    @abc.abstractmethod
    def time(self, sigma: Any) -> np.ndarray:
        """The network's time input at the (rounded) levels `sigma`, numpy of `time_dtype`."""

    time_dtype: ClassVar[Any] = np.float32

    @abc.abstractmethod
    def denoised(self, net: Net, x: Array, sigma: Array, time: Array) -> tuple[Array, Array | None]:
        """(x0 prediction (B, ...), variance values (B, ...) or None) at own-coordinate x and
        one level: sigma and the network time `time` (scalars)."""

    def start_std(self, sigma: float) -> float:
        """Std of the start distribution at the grid's first level, in own coordinates: the
        pure-noise approximation of x there (1 for ddpm and flow; sigma for edm)."""
        return 1.0

    @abc.abstractmethod
    def training_loss(
        self,
        model_fn: Callable[..., Array],
        x0: Array,
        rng: Array,
        *,
        labels: Array | None = None,
        num_classes: int | None = None,
        label_dropout: float = 0.0,
    ) -> Array:
        """Per-example loss (B,) of model_fn(x, time[, labels]) on clean data x0 (B, ...)."""

    @abc.abstractmethod
    def target(self, x: Array, sigma: Array, x0: Array) -> Array:
        """The network output whose denoiser gives x0 at own-coordinate x and level sigma
        ((B,) or scalar): the training target with the noise it implies."""

    @abc.abstractmethod
    def sigma_of_time(self, time: Array) -> Array:
        """jax: the sigma (B,) of network time inputs (B,) (`time`'s inverse)."""

    def spacing_sigma(self, u: np.ndarray, sigma_max: float) -> np.ndarray:
        """float64 sigmas at positions u in [0, 1] along a continuous formulation's own time
        axis (u = 0 clean data, u = 1 its top level; `sigma_max` where it has no top): the
        axis 'linspace' and 'quadratic' grids are uniform in."""
        raise NotImplementedError(f"the {self.name} formulation is discrete")

    def fraction_sigma(self, fraction: float, sigma_max: float) -> float:
        """The sigma a fraction (0..1) along the time axis from clean data (SDEdit strength)."""
        return float(self.spacing_sigma(np.asarray([float(fraction)]), sigma_max)[0])

    def describe(self) -> str:
        return self.name


def nearest_level(levels: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """int64 index of the level nearest each sigma > 0 in log sigma (levels increasing)."""
    log_levels = np.log(levels)
    with np.errstate(divide="ignore"):
        log_sigma = np.log(np.maximum(sigma, 1e-300))
    right = np.clip(np.searchsorted(log_levels, log_sigma), 1, max(len(levels) - 1, 1))
    left = right - 1
    if len(levels) == 1:
        return np.zeros(np.shape(sigma), np.int64)
    nearer_left = np.abs(log_sigma - log_levels[left]) <= np.abs(log_levels[right] - log_sigma)
    return np.where(nearer_left, left, right).astype(np.int64)


def bcast(value: Array, x: Array) -> Array:
    """A scalar or (B,) value shaped to broadcast against x (B, ...)."""
    value = jnp.asarray(value, x.dtype)
    return value.reshape(value.shape + (1,) * (x.ndim - value.ndim))
