"""The ddpm formulation (Ho et al. 2020; Improved DDPM): a discrete variance-preserving chain of
T timesteps on a `schedules.Schedule`, x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, with a
network predicting eps, x0 or v at integer t (and optionally its own variance).

As a formulation its levels are sigma_t = sqrt((1 - ab_t) / ab_t), t = 0..T-1, its own
coordinates are the samplers' x_vp (scale 1), and its time input is the timestep t itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.formulations.base import Formulation, Net, bcast, nearest_level
from diffusion_jax.schedules import Schedule

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class DDPM(Formulation):
    """A schedule and what the network predicts. prediction: 'eps' | 'x0' | 'v'; learn_sigma:
    the network also outputs Improved DDPM's variance values (2C channels). weighting,
    min_snr_gamma and vlb_weight: the training loss (`diffusion.training_loss`)."""

    schedule: Schedule
    prediction: str = "eps"
    learn_sigma: bool = False
    weighting: str = "simple"
    min_snr_gamma: float = 5.0
    vlb_weight: float = 0.001

    name: ClassVar[str] = "ddpm"
    has_discrete_vlb: ClassVar[bool] = True
    time_dtype: ClassVar[Any] = np.int32

    def __post_init__(self) -> None:
        if self.prediction not in diffusion.PREDICTIONS:
            raise ValueError(
                f"unknown prediction {self.prediction!r}; use one of {diffusion.PREDICTIONS}"
            )
        if isinstance(self.schedule.alphas_cumprod, jax.core.Tracer):
            # Its levels are float64 numpy, computed before tracing (every grid and solver
            # coefficient comes from them); a traced schedule has no values yet.
            raise ValueError(
                "the ddpm formulation needs a concrete schedule (numpy values); close over the "
                "schedule instead of passing it to a jitted function as an argument"
            )

    @property
    def learned_variance(self) -> bool:
        return bool(self.learn_sigma)

    @property
    def levels(self) -> np.ndarray:
        ab = np.asarray(self.schedule.alphas_cumprod, np.float64)
        return np.sqrt((1.0 - ab) / ab)

    @property
    def sigma_range(self) -> tuple[float, float]:
        levels = self.levels
        return float(levels[0]), float(levels[-1])

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def scale(self, sigma: Any) -> np.ndarray:
        return np.ones_like(np.asarray(sigma, np.float64))

    def time(self, sigma: Any) -> np.ndarray:
        return nearest_level(self.levels, np.asarray(sigma, np.float64)).astype(np.int32)

    def sigma_of_time(self, time: Array) -> Array:
        return jnp.asarray(self.levels, diffusion.float_dtype())[jnp.asarray(time)]

    def fraction_sigma(self, fraction: float, sigma_max: float = 0.0) -> float:
        t = round(float(fraction) * (self.num_timesteps - 1))
        return float(self.levels[t]) if t > 0 else 0.0

    def denoised(self, net: Net, x: Array, sigma: Array, time: Array) -> tuple[Array, Array | None]:
        t = jnp.full((x.shape[0],), time, dtype=jnp.int32)
        out_shape = (*x.shape[:-1], 2 * x.shape[-1]) if self.learn_sigma else x.shape
        out = net(x, t)
        if out.shape != out_shape:
            hint = "" if self.learn_sigma else " (a learned-variance model needs learn_sigma=True)"
            raise ValueError(f"model_fn returned shape {out.shape}; expected {out_shape}{hint}")
        out = out.astype(x.dtype)
        var_values = None
        if self.learn_sigma:
            out, var_values = diffusion.split_learned_variance(out)
        x0, _ = diffusion.model_output_to_x0_eps(self.schedule, x, t, out, self.prediction)
        return x0, var_values

    def target(self, x: Array, sigma: Array, x0: Array) -> Array:
        s2 = bcast(jnp.square(sigma), x)
        a, s = jax.lax.rsqrt(1.0 + s2), jnp.sqrt(s2 / (1.0 + s2))
        eps = (x - a * x0) / s
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.prediction]

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
        return diffusion.training_loss(
            model_fn,
            self.schedule,
            x0,
            rng,
            prediction=self.prediction,
            weighting=self.weighting,
            min_snr_gamma=self.min_snr_gamma,
            labels=labels,
            num_classes=num_classes,
            label_dropout=label_dropout,
            learn_sigma=self.learn_sigma,
            vlb_weight=self.vlb_weight,
        )


def as_formulation(
    process: Formulation | Schedule, prediction: str = "eps", learn_sigma: bool = False
) -> Formulation:
    """A formulation as given, or a schedule's ddpm formulation with `prediction` and
    `learn_sigma` (which describe only a ddpm network: ValueError with another formulation)."""
    if isinstance(process, Schedule):
        return DDPM(process, prediction=prediction, learn_sigma=learn_sigma)
    if prediction != "eps" or learn_sigma:
        raise ValueError(
            f"prediction and learn_sigma describe a ddpm model; the {process.name} "
            "formulation fixes its network's output"
        )
    return process
