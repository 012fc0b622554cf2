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


def _two_class_mixture_model(sch, mu: tuple[float, float], s: float):
    """Exact eps model for x0 ~ N(mu[y], s^2) per pixel, y in {0, 1} equally likely; the null
    label 2 gives the optimal unconditional (mixture) denoiser."""
    from diffusion_jax import diffusion
    from diffusion_jax.testing.gaussian_oracle import optimal_model

    conditional = [optimal_model(sch, m, s, "eps") for m in mu]

    def model_fn(x_t: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        ab = diffusion.extract(sch.alphas_cumprod, t, x_t.ndim)
        a, var = jnp.sqrt(ab), ab * s * s + (1.0 - ab)
        # Responsibilities of the two components given x_t (equal priors, equal variances).
        logits = jnp.stack([-jnp.square(x_t - a * m) / (2 * var) for m in mu])
        resp = jax.nn.softmax(logits, axis=0)
        eps = jnp.stack([f(x_t, t) for f in conditional])
        y = labels.reshape((-1,) + (1,) * (x_t.ndim - 1))
        chosen = jnp.where(y == 0, eps[0], eps[1])
        return jnp.where(y == 2, jnp.sum(resp * eps, axis=0), chosen)

    return model_fn


def test_guidance_scale_raises_class_accuracy_on_an_exact_two_class_model() -> None:
    """Scale 0 samples the mixture (labels ignored: ~50% land nearer their class mean), scale 1
    the class-conditional N(mu_y, s^2) (P = Phi(1) = 0.841 here), and larger scales sharpen it."""
    from diffusion_jax import samplers, schedules

    sch = schedules.get_schedule("linear", 1000)
    mu, s, n = (-0.5, 0.5), 0.5, 4000
    model_fn = _two_class_mixture_model(sch, mu, s)
    labels = jnp.arange(n, dtype=jnp.int32) % 2

    def accuracy(scale: float) -> float:
        x = samplers.sample(
            model_fn,
            sch,
            (n, 1, 1, 1),
            jax.random.key(0),
            sampler="ddim",
            num_steps=50,
            labels=labels,
            guidance_scale=scale,
            num_classes=2,
            clip_x0=False,
        )
        nearest = (np.asarray(x).reshape(n) > 0).astype(np.int32)
        return float(np.mean(nearest == np.asarray(labels)))

    acc = {scale: accuracy(scale) for scale in (0.0, 1.0, 3.0)}
    assert abs(acc[0.0] - 0.5) < 0.04
    assert abs(acc[1.0] - 0.8413) < 0.03
    assert acc[3.0] > acc[1.0] + 0.05
