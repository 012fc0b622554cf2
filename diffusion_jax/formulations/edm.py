"""The EDM formulation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): continuous noise level sigma, x = x0 + sigma n, and a preconditioned
denoiser

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

with F the network and (Table 1 of the paper, sigma_data the data's standard deviation)

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out  = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = ln(sigma) / 4.

Training draws ln(sigma) ~ N(P_mean, P_std^2) and minimises lambda(sigma) |D(x; sigma) - x0|^2
with lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2, i.e. the network's
own target (x0 - c_skip x) / c_out at unit weight.

The network is the same U-Net as the DDPM formulation's; its sinusoidal time embedding takes
`NOISE_INPUT_SCALE * c_noise` (see there). Pure functions of arrays: no configs, no I/O.
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
# The U-Net's time input is NOISE_INPUT_SCALE * c_noise. Its sinusoidal embedding has
# frequencies 1 down to 1e-4 (`models.unet.timestep_embedding`), made for integer timesteps in
# [0, 1000). c_noise = ln(sigma) / 4 spans only [-1.55, 1.10] over EDM's sigma range
# [0.002, 80]: even the fastest sinusoid would turn by less than half a period over it, and all
# but a few embedding channels would be constant. Scaled by 250 the span is ~660, as wide as the
# DDPM formulation's timesteps, so the same embedding resolves noise levels as finely as there.
# (Fixed: changing it changes what a trained network means.)
NOISE_INPUT_SCALE = 250.0


def _check_positive(name: str, value: Any) -> None:
    if not is_real(value) or not 0.0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


@dataclasses.dataclass(frozen=True)
class EDM(Formulation):
    """The EDM formulation's constants: sigma_data (the data's std; images in [-1, 1]: EDM's 0.5)
    and the training noise distribution ln(sigma) ~ N(p_mean, p_std^2).

    As a formulation: continuous levels, own coordinates x = x0 + sigma n (scale
    sqrt(1 + sigma^2) from the samplers' x_vp), time input NOISE_INPUT_SCALE * c_noise, start
    N(0, sigma_max^2), and a time axis that is sigma itself (EDM's t = sigma)."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2

    name: ClassVar[str] = "edm"
    default_spacing: ClassVar[str] = "karras"

    def __post_init__(self) -> None:
        _check_positive("sigma_data", self.sigma_data)
        _check_positive("p_std", self.p_std)
        if not is_real(self.p_mean) or not math.isfinite(self.p_mean):
            raise ValueError(f"p_mean must be a finite number; got {self.p_mean!r}")

    # Coefficients: sigma may be a Python float, numpy or jax array (any shape); the result has
    # sigma's array type and shape.
    def c_skip(self, sigma: Any) -> Any:
        sd2 = self.sigma_data**2
        return sd2 / (sigma**2 + sd2)

    def c_out(self, sigma: Any) -> Any:
        sd = self.sigma_data
        return sigma * sd / _sqrt(sigma**2 + sd**2)

    def c_in(self, sigma: Any) -> Any:
        return 1.0 / _sqrt(sigma**2 + self.sigma_data**2)

    def c_noise(self, sigma: Any) -> Any:
        return _log(sigma) / 4.0

    def loss_weight(self, sigma: Any) -> Any:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
        sd = self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    def net_time(self, sigma: Array, batch: int) -> Array:
        """The U-Net's time input (B,) float32 at noise level sigma (scalar or (B,))."""
        c = jnp.asarray(self.c_noise(jnp.asarray(sigma, jnp.float32)), jnp.float32)
        return jnp.broadcast_to(NOISE_INPUT_SCALE * c, (batch,))

    def denoise(self, net: Callable[[Array, Array], Array], x: Array, sigma: Any) -> Array:
        """D(x; sigma) (B, ...) with net(x_in (B, ...), time (B,)) -> F (labels and guidance
        bound in, e.g. `guidance.bind`). sigma: a scalar or (B,), > 0."""
        sigma = jnp.asarray(sigma, x.dtype)
        s = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))
        f = net((self.c_in(s) * x).astype(x.dtype), self.net_time(sigma, x.shape[0]))
        return (self.c_skip(s) * x + self.c_out(s) * f.astype(x.dtype)).astype(x.dtype)

    # The formulation interface (`formulations.base`).
    @property
    def sigma_range(self) -> tuple[float, float]:
        return 0.0, math.inf

    def scale(self, sigma: Any) -> np.ndarray:
        return np.sqrt(1.0 + np.square(np.asarray(sigma, np.float64)))

    def time(self, sigma: Any) -> np.ndarray:
        sigma = np.asarray(sigma, np.float64)
        return (NOISE_INPUT_SCALE * np.log(sigma) / 4.0).astype(np.float32)

    def sigma_of_time(self, time: Array) -> Array:
        return jnp.exp(4.0 * jnp.asarray(time, jnp.float32) / NOISE_INPUT_SCALE)

    def denoised(self, net: Net, x: Array, sigma: Array, time: Array) -> tuple[Array, Array | None]:
        s = bcast(sigma, x)
        time = jnp.broadcast_to(jnp.asarray(time, jnp.float32), (x.shape[0],))
        f = net((self.c_in(s) * x).astype(x.dtype), time)
        if f.shape != x.shape:
            raise ValueError(f"model_fn returned shape {f.shape}; expected {x.shape}")
        return (self.c_skip(s) * x + self.c_out(s) * f.astype(x.dtype)).astype(x.dtype), None

    def start_std(self, sigma: float) -> float:
        return float(sigma)

    def target(self, x: Array, sigma: Array, x0: Array) -> Array:
        s = bcast(sigma, x)
        return (x0 - self.c_skip(s) * x) / self.c_out(s)

    def spacing_sigma(self, u: np.ndarray, sigma_max: float) -> np.ndarray:
        return np.asarray(u, np.float64) * float(sigma_max)

    def sample_sigma(self, rng: Array, batch: int) -> Array:
        """Training noise levels (B,) float32: exp(p_mean + p_std n), n ~ N(0, 1)."""
        n = jax.random.normal(rng, (batch,), jnp.float32)
        return jnp.exp(self.p_mean + self.p_std * n)

    def training_loss(
        self,
        model_fn: Callable[..., Array],
        x0: Array,
        rng: Array,
        *,
        labels: Array | None = None,
        num_classes: int | None = None,
        label_dropout: float = 0.0,
        sigma: Array | None = None,
        noise: Array | None = None,
    ) -> Array:
        """Per-example loss (B,): lambda(sigma) mean |D(x0 + sigma n; sigma) - x0|^2 over the
        pixels, sigma ~ lognormal (`sample_sigma`) and n ~ N(0, I) drawn from `rng` unless
        given. model_fn(x_in, time) or model_fn(x_in, time, labels) is the network F; with
        label_dropout > 0 each label becomes the null class num_classes with that probability
        (classifier-free guidance training), as in `diffusion.training_loss`."""
        check_label_dropout(label_dropout, labels, num_classes)
        sigma_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
        batch = x0.shape[0]
        if sigma is None:
            sigma = self.sample_sigma(sigma_rng, batch)
        if noise is None:
            noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        sigma = jnp.asarray(sigma, x0.dtype)
        s = sigma.reshape((batch,) + (1,) * (x0.ndim - 1))
        x = x0 + s * noise
        net = training_net(model_fn, labels, num_classes, label_dropout, drop_rng)
        d = self.denoise(net, x, sigma)
        mse = jnp.mean(jnp.square(d - x0), axis=tuple(range(1, x0.ndim)))
        return self.loss_weight(sigma) * mse


def from_config(diffusion_config: Any) -> EDM:
    """The EDM constants of a run's `diffusion` section (sigma_data, p_mean, p_std)."""
    d = diffusion_config
    return EDM(sigma_data=d.sigma_data, p_mean=d.p_mean, p_std=d.p_std)


def _sqrt(v: Any) -> Any:
    return jnp.sqrt(v) if isinstance(v, jax.Array) else np.sqrt(v)


def _log(v: Any) -> Any:
    return jnp.log(v) if isinstance(v, jax.Array) else np.log(v)
