"""Flow matching / rectified flow (Lipman et al. 2023, Liu et al. 2023; SD3 and SiT's choices):
x_t = (1 - t) x0 + t n for t in [0, 1], and a network predicting the velocity v = n - x0.

As a formulation: sigma = t / (1 - t) (t = 1 is sigma = inf: pure noise), a = 1 - t, own
coordinates x_t = x~ / (1 + sigma), the denoiser x0 = x_t - t v, and a time input of
FLOW_TIME_SCALE * t (the U-Net's sinusoidal embedding is made for inputs in [0, 1000)).

Training draws t from `time_sampling`: 'uniform', or 'logit_normal' (sigmoid of N(logit_mean,
logit_std^2); SD3's default 0, 1), then applies the resolution `shift` s (SD3, eq. 23):
t' = s t / (1 + (s - 1) t), i.e. sigma' = s sigma, more weight on high noise for s > 1. The
loss is the plain velocity MSE mean |v_pred - v|^2. The time axis of the samplers' 'linspace'
and 'quadratic' grids is the unshifted t with the same shift applied, so those grids follow
the training distribution's shift as SD3's sampler does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import check_label_dropout, training_net
from diffusion_jax.formulations.base import Formulation, Net, bcast
from diffusion_jax.values import is_real

Array = jax.Array

TIME_SAMPLINGS = ("uniform", "logit_normal")
# The network's time input is FLOW_TIME_SCALE * t: the range of the ddpm formulation's
# timesteps, which the U-Net's embedding frequencies were chosen for (as SD3 feeds 1000 t).
FLOW_TIME_SCALE = 1000.0


@dataclasses.dataclass(frozen=True)
class Flow(Formulation):
    """Flow matching's training distribution of t: time_sampling, (logit_mean, logit_std) for
    'logit_normal', and the shift (1 = none)."""

    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    name: ClassVar[str] = "flow"

    def __post_init__(self) -> None:
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(
                f"unknown time_sampling {self.time_sampling!r}; use one of {TIME_SAMPLINGS}"
            )
        if not is_real(self.logit_mean) or not math.isfinite(self.logit_mean):
            raise ValueError(f"logit_mean must be a finite number; got {self.logit_mean!r}")
        for key in ("logit_std", "shift"):
            value = getattr(self, key)
            if not is_real(value) or not 0.0 < value < math.inf:
                raise ValueError(f"{key} must be a finite number > 0; got {value!r}")

    @property
    def sigma_range(self) -> tuple[float, float]:
        return 0.0, math.inf

    def scale(self, sigma: Any) -> np.ndarray:
        t = _t_of_sigma(sigma)
        return np.sqrt(np.square(t) + np.square(1.0 - t))

    def time(self, sigma: Any) -> np.ndarray:
        return (FLOW_TIME_SCALE * _t_of_sigma(sigma)).astype(np.float32)

    def sigma_of_time(self, time: Array) -> Array:
        t = jnp.asarray(time, jnp.float32) / FLOW_TIME_SCALE
        return t / (1.0 - t)

    def denoised(self, net: Net, x: Array, sigma: Array, time: Array) -> tuple[Array, Array | None]:
        time = jnp.broadcast_to(jnp.asarray(time, jnp.float32), (x.shape[0],))
        v = net(x, time)
        if v.shape != x.shape:
            raise ValueError(f"model_fn returned shape {v.shape}; expected {x.shape}")
        t = bcast(time / FLOW_TIME_SCALE, x)
        return (x - t * v.astype(x.dtype)).astype(x.dtype), None

    def target(self, x: Array, sigma: Array, x0: Array) -> Array:
        s = bcast(sigma, x)
        # v = (x_t - x0) / t with t = sigma / (1 + sigma), 1 at sigma = inf (pure noise), where
        # (1 + sigma) / sigma would be inf / inf.
        t = jnp.where(jnp.isinf(s), 1.0, s / (1.0 + s))
        return (x - x0) / t

    def spacing_sigma(self, u: np.ndarray, sigma_max: float) -> np.ndarray:
        u = np.asarray(u, np.float64)
        with np.errstate(divide="ignore"):
            return np.where(u >= 1.0, np.inf, self.shift * u / np.maximum(1.0 - u, 1e-300))

    def shifted(self, t: Array) -> Array:
        """t' = shift t / (1 + (shift - 1) t)."""
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def sample_t(self, rng: Array, batch: int) -> Array:
        """Training times (B,) float32 in (0, 1): `time_sampling`, then the shift."""
        if self.time_sampling == "uniform":
            t = jax.random.uniform(rng, (batch,), jnp.float32)
        else:
            n = jax.random.normal(rng, (batch,), jnp.float32)
            t = jax.nn.sigmoid(self.logit_mean + self.logit_std * n)
        return self.shifted(t)

    def training_loss(
        self,
        model_fn: Callable[..., Array],
        x0: Array,
        rng: Array,
        *,
        labels: Array | None = None,
        num_classes: int | None = None,
        label_dropout: float = 0.0,
        t: Array | None = None,
        noise: Array | None = None,
    ) -> Array:
        """Per-example loss (B,): mean |v_pred - (n - x0)|^2 over the pixels at x_t =
        (1 - t) x0 + t n, t from `sample_t` and n ~ N(0, I) drawn from `rng` unless given;
        model_fn(x_t, FLOW_TIME_SCALE t[, labels]). label_dropout as in
        `diffusion.training_loss` (the null class is num_classes)."""
        check_label_dropout(label_dropout, labels, num_classes)
        t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
        batch = x0.shape[0]
        if t is None:
            t = self.sample_t(t_rng, batch)
        if noise is None:
            noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        t = jnp.asarray(t, x0.dtype)
        tb = bcast(t, x0)
        x_t = ((1.0 - tb) * x0 + tb * noise).astype(x0.dtype)
        net = training_net(model_fn, labels, num_classes, label_dropout, drop_rng)
        v = net(x_t, FLOW_TIME_SCALE * t)
        err = jnp.square(v.astype(x0.dtype) - (noise - x0))
        return jnp.mean(err, axis=tuple(range(1, x0.ndim)))


def _t_of_sigma(sigma: Any) -> np.ndarray:
    """t = sigma / (1 + sigma), 1 at sigma = inf (numpy float64)."""
    sigma = np.asarray(sigma, np.float64)
    with np.errstate(invalid="ignore"):
        t = sigma / (1.0 + sigma)
    return np.where(np.isinf(sigma), 1.0, t)
