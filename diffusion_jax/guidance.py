"""Guidance on the denoiser of any formulation: D_w = D_g + w (D - D_g) at the guided levels.

D is the model's x0 prediction and D_g its guide's, at the same input and level:
- classifier-free guidance (Ho & Salimans 2022): the guide is the same network with the null
  label `num_classes` (trained with label dropout); both come from one call on the batch
  doubled by concatenation;
- autoguidance (Karras et al. 2024): the guide is a weaker model of the same data and
  formulation (smaller, trained less, or a shorter EMA) given the same labels, or none for an
  unconditional model, which classifier-free guidance cannot guide;
- the guidance interval (Kynkaanniemi et al. 2024): guide only at levels sigma in (lo, hi]
  and take D alone elsewhere, where it costs one network evaluation instead of two.
The combination is affine with weights summing to 1, so guiding x0 equals guiding the
network's eps, v or EDM output; a learned variance is the model's own (as in GLIDE and DiT).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.values import is_real

Array = jax.Array
Net = Callable[[Array, Array], Array]

# The default guidance interval: every level (sigma > 0, including sigma = inf).
EVERYWHERE = (0.0, math.inf)


def check_interval(interval: Any) -> tuple[float, float]:
    """`interval` as (lo, hi) floats; ValueError naming the fix unless 0 <= lo < hi."""
    ok = isinstance(interval, (tuple, list)) and len(interval) == 2
    ok = ok and all(is_real(v) and not math.isnan(v) for v in interval)
    if not ok or not 0.0 <= interval[0] < interval[1]:
        raise ValueError(
            f"guidance_interval={interval!r}; use (sigma_lo, sigma_hi) with 0 <= sigma_lo < "
            "sigma_hi (sigma_hi may be inf, 1e999 on a command line): guidance applies for "
            "sigma_lo < sigma <= sigma_hi"
        )
    return float(interval[0]), float(interval[1])


def in_interval(sigmas: Any, interval: tuple[float, float]) -> np.ndarray:
    """bool: which levels (float64) lie in the guidance interval (lo, hi]."""
    sigmas = np.asarray(sigmas, np.float64)
    return (sigmas > interval[0]) & (sigmas <= interval[1])


@dataclasses.dataclass(frozen=True)
class Guidance:
    """How a denoiser is guided.

    pair: the model and its guide in one call, `pair(x (2B, ...), time (2B,))`, the first B
    rows the model's output, the last B the guide's. scale: w, a scalar or (B,) per sample.
    interval: (lo, hi], the levels guided.
    """

    pair: Net
    scale: Any
    interval: tuple[float, float] = EVERYWHERE

    @property
    def everywhere(self) -> bool:
        return self.interval == EVERYWHERE

    def denoised(
        self, formulation: Any, x: Array, sigma: Array, time: Array
    ) -> tuple[Array, Array | None]:
        """(D_g + w (D - D_g), the model's variance values or None) at x (B, ...) in the
        formulation's own coordinates."""
        batch = x.shape[0]
        x0, var_values = formulation.denoised(self.pair, jnp.concatenate([x, x]), sigma, time)
        model, guide = x0[:batch], x0[batch:]
        scale = jnp.asarray(self.scale, x0.dtype)
        if scale.ndim == 1:
            scale = scale.reshape(scale.shape + (1,) * (x0.ndim - 1))
        guided = (guide + scale * (model - guide)).astype(x0.dtype)
        return guided, None if var_values is None else var_values[:batch]


def bind(
    model_fn: Callable[..., Array],
    labels: Array | None,
    guidance_scale: Any,
    num_classes: int | None,
    batch: int,
    *,
    guide_fn: Callable[..., Array] | None = None,
    interval: tuple[float, float] = EVERYWHERE,
) -> tuple[Net, Guidance | None]:
    """(net, guidance): `model_fn(x, t[, labels])` as `net(x (B, ...), t (B,))` with the labels
    bound, and how to guide it (None: not guided).

    guide_fn: the guide network for autoguidance (called like model_fn, with the same labels);
    without it a scale other than 1 is classifier-free guidance (null label `num_classes`).
    Scale 1 is the model alone; scale 0 over every level the guide alone.
    Raises ValueError (before anything is traced) for classifier-free guidance without labels
    or num_classes, or labels whose shape is not (batch,).
    """
    if labels is not None and jnp.shape(labels) != (batch,):
        raise ValueError(f"labels must have shape ({batch},); got {jnp.shape(labels)}")
    interval = check_interval(interval)
    scale_shape = jnp.shape(guidance_scale)
    if scale_shape not in ((), (batch,)):
        raise ValueError(
            f"guidance_scale must be a scalar or one per sample ({batch},); got shape "
            f"{jnp.shape(guidance_scale)}"
        )
    net = _with_labels(model_fn, labels)
    if is_real(guidance_scale) and guidance_scale == 1.0:
        return net, None
    if guide_fn is not None:
        guide = _with_labels(guide_fn, labels)

        def pair(x: Array, t: Array) -> Array:
            return jnp.concatenate([net(x[:batch], t[:batch]), guide(x[batch:], t[batch:])])

    else:
        if labels is None:
            raise ValueError(
                "guidance_scale != 1 needs labels (B,) for classifier-free guidance, or a "
                "guide model (guide_fn) for autoguidance"
            )
        if num_classes is None:
            raise ValueError(
                "guidance_scale != 1 needs num_classes: the unconditional branch uses the null "
                "label num_classes"
            )
        null = jnp.full((batch,), num_classes, dtype=jnp.asarray(labels).dtype)
        guide = _with_labels(model_fn, null)
        both = jnp.concatenate([jnp.asarray(labels), null])

        def pair(x: Array, t: Array) -> Array:
            return model_fn(x, t, both)

    if is_real(guidance_scale) and guidance_scale == 0.0 and interval == EVERYWHERE:
        return guide, None
    return net, Guidance(pair=pair, scale=guidance_scale, interval=interval)


def _with_labels(fn: Callable[..., Array], labels: Array | None) -> Net:
    if labels is None:
        return lambda x, t: fn(x, t)
    return lambda x, t: fn(x, t, labels)
