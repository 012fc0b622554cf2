"""Classifier-free guidance: one batched model call, u + s * (c - u)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.guidance import classifier_free_guidance

NULL = 10


class RecordingModel:
    """model_fn(x, t, labels) whose output depends on the label; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[jax.Array, jax.Array, jax.Array]] = []

    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        self.calls.append((x, t, labels))
        shift = labels.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sin(x) * (1.0 + shift) + 0.01 * t.astype(x.dtype).reshape(shift.shape)


def _inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    return x, jnp.array([5, 7, 9], jnp.int32), jnp.array([0, 3, 9], jnp.int32)


def test_conditional_and_unconditional_come_from_one_batched_call() -> None:
    model = RecordingModel()
    x, t, labels = _inputs()
    classifier_free_guidance(model, 2.0, NULL)(x, t, labels)
    assert len(model.calls) == 1
    x2, t2, labels2 = model.calls[0]
    assert x2.shape == (6, 4, 4, 2)
    np.testing.assert_array_equal(x2, jnp.concatenate([x, x]))
    np.testing.assert_array_equal(t2, [5, 7, 9, 5, 7, 9])
    np.testing.assert_array_equal(labels2, [0, 3, 9, NULL, NULL, NULL])


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_guided_output_is_u_plus_scale_times_c_minus_u(scale: float) -> None:
    model = RecordingModel()
    x, t, labels = _inputs()
    out = classifier_free_guidance(model, scale, NULL)(x, t, labels)
    cond = model(x, t, labels)
    uncond = model(x, t, jnp.full_like(labels, NULL))
    np.testing.assert_allclose(out, uncond + scale * (cond - uncond), rtol=1e-6, atol=1e-6)
    if scale == 1.0:
        np.testing.assert_allclose(out, cond, rtol=1e-6, atol=1e-6)
    if scale == 0.0:
        np.testing.assert_allclose(out, uncond, rtol=1e-6, atol=1e-6)


def test_per_sample_scales_and_jit() -> None:
    model = RecordingModel()
    x, t, labels = _inputs()
    scales = jnp.array([0.0, 1.0, 3.0])
    out = jax.jit(lambda s, x: classifier_free_guidance(model, s, NULL)(x, t, labels))(scales, x)
    for i, s in enumerate([0.0, 1.0, 3.0]):
        ref = classifier_free_guidance(model, s, NULL)(
            x[i : i + 1], t[i : i + 1], labels[i : i + 1]
        )
        np.testing.assert_allclose(out[i : i + 1], ref, rtol=1e-6, atol=1e-6)
