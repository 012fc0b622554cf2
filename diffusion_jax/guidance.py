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
