"""Guidance on the denoiser: classifier-free (one batched call), autoguidance (a guide
network) and the guidance interval, on every formulation and sampler."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import formulations, samplers, schedules
from diffusion_jax.guidance import EVERYWHERE, bind, check_interval, in_interval

NULL = 10
FORMULATIONS = {
    "ddpm": formulations.DDPM(schedules.get_schedule("linear", 1000)),
    "edm": formulations.EDM(),
    "flow": formulations.Flow(),
}


class RecordingModel:
    """model_fn(x, t, labels=None) whose output depends on the label; records every call."""

    def __init__(self, gain: float = 1.0) -> None:
        self.gain = gain
        self.calls: list[tuple[jax.Array, jax.Array, jax.Array | None]] = []

    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        self.calls.append((x, t, labels))
        t = jnp.asarray(t).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        out = self.gain * jnp.sin(x) + 1e-3 * t
        if labels is None:
            return out
        shift = labels.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return out * (1.0 + 0.1 * shift)


def _inputs() -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    return x, jnp.array([0, 3, 9], jnp.int32)


def _denoised(formulation, fn, x, sigma, labels=None):
    time = formulation.time(np.asarray(sigma))
    net = (lambda x, t: fn(x, t)) if labels is None else (lambda x, t: fn(x, t, labels))
    return formulation.denoised(net, x, jnp.float32(sigma), jnp.asarray(time))[0]


def test_classifier_free_guidance_is_one_call_on_the_doubled_batch() -> None:
    model = RecordingModel()
    x, labels = _inputs()
    _, guidance = bind(model, labels, 2.0, NULL, 3)
    assert guidance is not None
    guidance.denoised(FORMULATIONS["ddpm"], x, jnp.float32(1.0), jnp.int32(500))
    assert len(model.calls) == 1
    x2, t2, labels2 = model.calls[0]
    np.testing.assert_array_equal(x2, jnp.concatenate([x, x]))
    np.testing.assert_array_equal(t2, [500] * 6)
    np.testing.assert_array_equal(labels2, [0, 3, 9, NULL, NULL, NULL])


@pytest.mark.parametrize("name", sorted(FORMULATIONS))
@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_guided_x0_is_unconditional_plus_scale_times_the_difference(
    name: str, scale: float
) -> None:
    formulation, model = FORMULATIONS[name], RecordingModel()
    x, labels = _inputs()
    sigma = 1.3
    _, guidance = bind(model, labels, scale, NULL, 3, interval=(0.5, 5.0))
    assert guidance is not None
    time = jnp.asarray(formulation.time(np.asarray(sigma)))
    out, _ = guidance.denoised(formulation, x, jnp.float32(sigma), time)
    cond = _denoised(formulation, model, x, sigma, labels)
    uncond = _denoised(formulation, model, x, sigma, jnp.full_like(labels, NULL))
    np.testing.assert_allclose(out, uncond + scale * (cond - uncond), rtol=2e-5, atol=2e-5)


def test_autoguidance_gives_the_guide_the_models_labels() -> None:
    model, weak = RecordingModel(), RecordingModel(gain=0.5)
    x, labels = _inputs()
    formulation = FORMULATIONS["flow"]
    _, guidance = bind(model, labels, 2.0, NULL, 3, guide_fn=weak)
    assert guidance is not None
    time = jnp.asarray(formulation.time(np.asarray(1.0)))
    out, _ = guidance.denoised(formulation, x, jnp.float32(1.0), time)
    assert [len(m.calls) for m in (model, weak)] == [1, 1]
    np.testing.assert_array_equal(weak.calls[0][2], labels)
    d = _denoised(formulation, model, x, 1.0, labels)
    d_g = _denoised(formulation, weak, x, 1.0, labels)
    np.testing.assert_allclose(out, d_g + 2.0 * (d - d_g), rtol=2e-5, atol=2e-5)


def test_per_sample_scales_under_jit() -> None:
    model, formulation = RecordingModel(), FORMULATIONS["edm"]
    x, labels = _inputs()
    scales = jnp.array([0.0, 1.0, 3.0])

    @jax.jit
    def guided(scales: jax.Array, x: jax.Array) -> jax.Array:
        _, guidance = bind(model, labels, scales, NULL, 3)
        assert guidance is not None
        time = jnp.asarray(formulation.time(np.asarray(2.0)))
        return guidance.denoised(formulation, x, jnp.float32(2.0), time)[0]

    out = guided(scales, x)
    cond = _denoised(formulation, model, x, 2.0, labels)
    uncond = _denoised(formulation, model, x, 2.0, jnp.full_like(labels, NULL))
    for i, s in enumerate([0.0, 1.0, 3.0]):
        ref = uncond[i] + s * (cond[i] - uncond[i])
        np.testing.assert_allclose(out[i], ref, rtol=2e-5, atol=2e-5)


def test_learned_variance_is_the_models_own() -> None:
    formulation = formulations.DDPM(schedules.get_schedule("linear", 1000), learn_sigma=True)
    x, labels = _inputs()

    def model(x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        shift = labels.astype(x.dtype).reshape((-1, 1, 1, 1))
        return jnp.concatenate([jnp.sin(x) * (1 + shift), jnp.tanh(x) * shift], axis=-1)

    _, guidance = bind(model, labels, 3.0, NULL, 3)
    assert guidance is not None
    _, var = guidance.denoised(formulation, x, jnp.float32(1.0), jnp.int32(400))
    np.testing.assert_allclose(var, jnp.tanh(x) * labels.reshape((-1, 1, 1, 1)), rtol=1e-6)


def test_bind_refuses_guidance_it_cannot_do() -> None:
    model = RecordingModel()
    _, labels = _inputs()
    with pytest.raises(ValueError, match=r"needs labels .* or a guide model"):
        bind(model, None, 2.0, NULL, 3)
    with pytest.raises(ValueError, match="needs num_classes"):
        bind(model, labels, 2.0, None, 3)
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        bind(model, labels[:2], 1.0, NULL, 3)
    with pytest.raises(ValueError, match=r"guidance_scale must be a scalar or one per sample"):
        bind(model, labels, jnp.ones(2), NULL, 3)
    for bad in [(5.0, 1.0), (-1.0, 2.0), (1.0,), (0.0, math.nan), "0.3-5"]:
        with pytest.raises(ValueError, match="use \\(sigma_lo, sigma_hi\\)"):
            check_interval(bad)
    assert check_interval([0.3, math.inf]) == (0.3, math.inf)


def test_the_interval_is_half_open_and_decided_in_float64() -> None:
    sigmas = np.array([math.inf, 5.0, 5.0 + 1e-12, 1.0, 0.5, 0.5 - 1e-12])
    np.testing.assert_array_equal(
        in_interval(sigmas, (0.5, 5.0)), [False, True, False, True, False, False]
    )
    assert in_interval(sigmas, EVERYWHERE).all()


def _sampler_cases() -> list[tuple[str, str]]:
    cases = [(name, "ddpm") for name in samplers.registry.names()]
    # Every sampler on the continuous formulations too (heun needs a finite first level).
    return cases + [(name, f) for name in samplers.registry.names() for f in ("edm", "flow")]


@pytest.mark.parametrize(("sampler", "name"), _sampler_cases())
def test_interval_gives_unguided_steps_outside_and_guided_inside(sampler: str, name: str) -> None:
    """Every model evaluation of every sampler: D of the conditional model alone at levels
    outside (lo, hi], D_u + w (D_c - D_u) inside."""
    formulation, model = FORMULATIONS[name], RecordingModel()
    x, labels = _inputs()
    interval, scale = (0.5, 5.0), 2.0
    spec = samplers.SamplerSpec.create(
        sampler=sampler,
        num_steps=8,
        guidance_scale=scale,
        guidance_interval=interval,
        num_classes=NULL,
        timestep_spacing="karras",
        clip_x0=False,
    )
    run = jax.jit(
        lambda rng: spec.sample(
            model, formulation, x.shape, rng, labels=labels, return_trajectory=True
        )
    )
    _, traj = run(jax.random.key(1))
    sigmas = np.asarray(traj.sigmas, np.float64)
    inside = in_interval(samplers.driver.evaluation_sigmas(spec, formulation), interval)
    assert inside.any() and not inside.all()
    null = jnp.full_like(labels, NULL)
    for k in range(len(sigmas)):
        x_t, sigma, time = traj.x_t[k], traj.sigmas[k], traj.timesteps[k]
        cond = formulation.denoised(lambda x, t: model(x, t, labels), x_t, sigma, time)[0]
        if inside[k]:
            uncond = formulation.denoised(lambda x, t: model(x, t, null), x_t, sigma, time)[0]
            expected = uncond + scale * (cond - uncond)
        else:
            expected = cond
        np.testing.assert_allclose(traj.x0_pred[k], expected, rtol=1e-4, atol=1e-4)
    assert spec.network_evaluations(formulation) == len(sigmas) + int(inside.sum())


@pytest.mark.parametrize(
    ("sampler", "name"),
    [
        (sampler, ("ddpm", "edm", "flow")[i % 3])
        for i, sampler in enumerate(samplers.registry.names())
    ],
)
def test_autoguidance_by_the_model_itself_is_the_unguided_sampler(sampler: str, name: str) -> None:
    formulation, model = FORMULATIONS[name], RecordingModel()
    x, _ = _inputs()
    base = samplers.SamplerSpec.create(sampler=sampler, num_steps=6, timestep_spacing="karras")
    rng = jax.random.key(2)
    plain = jax.jit(lambda r: base.sample(model, formulation, x.shape, r))(rng)
    guided = base.replace(guidance_scale=2.5, guidance_interval=(0.1, 20.0))
    out = jax.jit(lambda r: guided.sample(model, formulation, x.shape, r, guide_fn=model))(rng)
    np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-5)


def test_autoguidance_guides_an_unconditional_model_away_from_its_guide() -> None:
    """D_w = D_g + w (D - D_g) with a guide network: every evaluation of an unconditional
    model, under jit, and the samples move away from the weaker guide's."""
    formulation = FORMULATIONS["flow"]
    model, weak = RecordingModel(), RecordingModel(gain=0.5)
    x, _ = _inputs()
    spec = samplers.SamplerSpec.create(sampler="dpm_solver++", num_steps=6, guidance_scale=2.0)
    run = jax.jit(
        lambda r: spec.sample(model, formulation, x.shape, r, guide_fn=weak, return_trajectory=True)
    )
    _, traj = run(jax.random.key(3))
    for k in range(traj.sigmas.shape[0]):
        args = (traj.x_t[k], traj.sigmas[k], traj.timesteps[k])
        d = formulation.denoised(lambda x, t: model(x, t), *args)[0]
        d_g = formulation.denoised(lambda x, t: weak(x, t), *args)[0]
        np.testing.assert_allclose(
            traj.x0_pred[k], jnp.clip(d_g + 2.0 * (d - d_g), -1, 1), rtol=1e-4, atol=1e-4
        )


def test_guidance_interval_names_the_samples_only_when_guided() -> None:
    spec = samplers.SamplerSpec.create(sampler="ddim", num_steps=10, guidance_interval=(0.3, 5))
    assert spec.name() == "ddim10"
    assert spec.replace(guidance_scale=2.0).name() == "ddim10_g2_gi0.3-5"
    assert spec.replace(guidance_scale=2.0, guidance_interval=(1, math.inf)).name() == (
        "ddim10_g2_gi1-inf"
    )
    assert isinstance(spec.replace(guidance_interval=[1.0, 2.0]).guidance_interval, tuple)
    with pytest.raises(ValueError, match="guidance_interval"):
        spec.replace(guidance_interval=(3.0, 1.0)).validate(FORMULATIONS["ddpm"])


def test_guided_evaluations_count_the_guides() -> None:
    formulation = FORMULATIONS["edm"]
    spec = samplers.SamplerSpec.create(sampler="heun", num_steps=5)
    assert spec.network_evaluations(formulation) == 9
    assert spec.replace(guidance_scale=2.0).network_evaluations(formulation) == 18
    levels = samplers.driver.evaluation_sigmas(spec, formulation)
    assert len(levels) == 9
    banded = spec.replace(guidance_scale=2.0, guidance_interval=(0.5, 10.0))
    assert banded.network_evaluations(formulation) == 9 + int(
        np.sum((levels > 0.5) & (levels <= 10.0))
    )


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
    the class-conditional N(mu_y, s^2) (P = Phi(1) = 0.841 here), and larger scales sharpen it;
    an interval that excludes every level is the conditional model."""
    sch = schedules.get_schedule("linear", 1000)
    mu, s, n = (-0.5, 0.5), 0.5, 4000
    model_fn = _two_class_mixture_model(sch, mu, s)
    labels = jnp.arange(n, dtype=jnp.int32) % 2

    def accuracy(scale: float, interval: tuple[float, float] = EVERYWHERE) -> float:
        x = samplers.sample(
            model_fn,
            sch,
            (n, 1, 1, 1),
            jax.random.key(0),
            sampler="ddim",
            num_steps=50,
            labels=labels,
            guidance_scale=scale,
            guidance_interval=interval,
            num_classes=2,
            clip_x0=False,
        )
        nearest = (np.asarray(x).reshape(n) > 0).astype(np.int32)
        return float(np.mean(nearest == np.asarray(labels)))

    acc = {scale: accuracy(scale) for scale in (0.0, 1.0, 3.0)}
    assert abs(acc[0.0] - 0.5) < 0.04
    assert abs(acc[1.0] - 0.8413) < 0.03
    assert acc[3.0] > acc[1.0] + 0.05
    assert accuracy(3.0, (1e6, 1e7)) == acc[1.0]
