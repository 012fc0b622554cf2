"""Classifier-free guidance (Ho & Salimans 2022).

The model is trained with labels randomly replaced by a null label (`num_classes`); at sampling
the conditional and unconditional outputs are combined as u + s * (c - u). The combination is
affine with weights summing to 1, so it means the same for 'eps', 'x0' and 'v' outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.values import is_real

Array = jax.Array


def classifier_free_guidance(
    model_fn: Callable[[Array, Array, Array], Array], guidance_scale: Any, null_label: int
) -> Callable[[Array, Array, Array], Array]:
    """Wrap `model_fn(x, t, labels)` into the guided `fn(x (B, ...), t (B,), labels (B,))`.

    The conditional and unconditional outputs come from ONE call of `model_fn` on the batch
    doubled by concatenation (2B, ...). guidance_scale: a scalar, or (B,) per sample; 1 gives
    the conditional output, 0 the unconditional one.
    """

    def guided(x: Array, t: Array, labels: Array) -> Array:
        batch = x.shape[0]
        labels = jnp.asarray(labels)
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        null = jnp.full_like(labels, null_label)
        out = model_fn(
            jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, null])
        )
        cond, uncond = out[:batch], out[batch:]
        scale = jnp.asarray(guidance_scale, dtype=out.dtype)
        if scale.ndim == 1:
            scale = scale.reshape(scale.shape + (1,) * (out.ndim - 1))
        return uncond + scale * (cond - uncond)

    return guided


def conditioned_model(
    model_fn: Callable[..., Array],
    labels: Array | None,
    guidance_scale: Any,
    num_classes: int | None,
    batch: int,
) -> Callable[[Array, Array], Array]:
    """`model_fn` as `net(x (B, ...), t (B,))` with the labels and guidance bound in.

    No labels: model_fn(x, t). Scale 1: the conditional model_fn(x, t, labels); scale 0: the
    unconditional one (null label `num_classes`); otherwise `classifier_free_guidance`.
    Raises ValueError (before anything is traced) for guidance without labels or num_classes,
    or labels whose shape is not (batch,).
    """
    guided = not (is_real(guidance_scale) and guidance_scale == 1.0)
    if guided and labels is None:
        raise ValueError("guidance_scale != 1 needs labels (B,) (classifier-free guidance)")
    if guided and num_classes is None:
        raise ValueError(
            "guidance_scale != 1 needs num_classes: the unconditional branch uses the null "
            "label num_classes"
        )
    if labels is not None and jnp.shape(labels) != (batch,):
        raise ValueError(f"labels must have shape ({batch},); got {jnp.shape(labels)}")
    if labels is None:
        return lambda x, t: model_fn(x, t)
    if not guided:
        return lambda x, t: model_fn(x, t, labels)
    assert num_classes is not None
    if is_real(guidance_scale) and guidance_scale == 0.0:
        null = jnp.full((batch,), num_classes, dtype=jnp.asarray(labels).dtype)
        return lambda x, t: model_fn(x, t, null)
    cfg = classifier_free_guidance(model_fn, guidance_scale, num_classes)
    return lambda x, t: cfg(x, t, labels)
