"""Forward process, posterior, conversions and losses, checked against closed forms."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, schedules

SCH = schedules.get_schedule("linear", 1000)
COS = schedules.get_schedule("cosine", 1000)


def _x0_noise_t(shape: tuple[int, ...], seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x0 = jax.random.uniform(k1, shape, minval=-1.0, maxval=1.0)
    noise = jax.random.normal(k2, shape)
    t = jax.random.randint(k3, shape[:1], 0, 1000)
    return x0, noise, t


def test_extract_gathers_float32_broadcastable_values() -> None:
    t = jnp.array([0, 5, 999])
    out = diffusion.extract(SCH.alphas_cumprod, t, 4)
    assert out.shape == (3, 1, 1, 1) and out.dtype == jnp.float32
    np.testing.assert_allclose(out[:, 0, 0, 0], SCH.alphas_cumprod[[0, 5, 999]], rtol=1e-7)


def test_extract_gathers_float64_when_x64_is_enabled() -> None:
    with jax.enable_x64(True):
        out = diffusion.extract(SCH.alphas_cumprod, jnp.array([3]), 2)
        assert out.dtype == jnp.float64
        assert float(out[0, 0]) == SCH.alphas_cumprod[3]


@pytest.mark.parametrize("sch", [SCH, COS], ids=["linear", "cosine"])
def test_q_sample_has_the_forward_process_moments(sch: schedules.Schedule) -> None:
    t = jnp.array([0, 10, 300, 700, 999])
    x0 = jnp.array([0.9, -0.5, 0.3, 1.0, -1.0])[:, None] * jnp.ones((5, 40_000))
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    x_t = np.asarray(diffusion.q_sample(sch, x0, t, noise), np.float64)
    ab = sch.alphas_cumprod[np.asarray(t)]
    n = x0.shape[1]
    std = np.sqrt(1 - ab)
    # Sample mean within 5 standard errors; sample variance within 5 of its standard errors.
    assert np.all(np.abs(x_t.mean(1) - np.sqrt(ab) * np.asarray(x0[:, 0])) < 5 * std / math.sqrt(n))
    assert np.all(np.abs(x_t.var(1) - (1 - ab)) < 5 * (1 - ab) * math.sqrt(2 / n))


def test_q_sample_works_for_any_trailing_shape_and_under_jit() -> None:
    for shape in [(3,), (3, 5), (3, 4, 4, 2)]:
        x0, noise, t = _x0_noise_t(shape)
        out = jax.jit(lambda a, b, c: diffusion.q_sample(SCH, a, c, b))(x0, noise, t)
        assert out.shape == shape
        ab = SCH.alphas_cumprod[np.asarray(t)].reshape((-1,) + (1,) * (len(shape) - 1))
        ref = np.sqrt(ab) * np.asarray(x0) + np.sqrt(1 - ab) * np.asarray(noise)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_eps_x0_conversions_round_trip() -> None:
    x0, noise, t = _x0_noise_t((64, 8))
    x_t = diffusion.q_sample(SCH, x0, t, noise)
    x0_back = diffusion.predict_x0_from_eps(SCH, x_t, t, noise)
    eps_back = diffusion.predict_eps_from_x0(SCH, x_t, t, x0)
    # float32 cancellation: 1/sqrt(ab) <= 157 amplifies ulp(x_t) for x0; 1/sigma <= 100 for eps.
    np.testing.assert_allclose(x0_back, x0, atol=1e-4)
    np.testing.assert_allclose(eps_back, noise, atol=1e-4)
    np.testing.assert_allclose(
        diffusion.predict_eps_from_x0(SCH, x_t, t, x0_back), noise, atol=2e-4
    )


def test_v_conversions_round_trip() -> None:
    x0, noise, t = _x0_noise_t((64, 8))
    x_t = diffusion.q_sample(SCH, x0, t, noise)
    v = diffusion.v_target(SCH, x0, noise, t)
    ab = SCH.alphas_cumprod[np.asarray(t)][:, None]
    np.testing.assert_allclose(
        v, np.sqrt(ab) * np.asarray(noise) - np.sqrt(1 - ab) * np.asarray(x0), atol=1e-6
    )
    np.testing.assert_allclose(diffusion.predict_x0_from_v(SCH, x_t, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(diffusion.predict_eps_from_v(SCH, x_t, t, v), noise, atol=1e-5)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_model_output_to_x0_eps_recovers_both_from_any_prediction(prediction: str) -> None:
    x0, noise, t = _x0_noise_t((32, 6))
    x_t = diffusion.q_sample(SCH, x0, t, noise)
    output = {"eps": noise, "x0": x0, "v": diffusion.v_target(SCH, x0, noise, t)}[prediction]
    x0_hat, eps_hat = diffusion.model_output_to_x0_eps(SCH, x_t, t, output, prediction)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-4)
    np.testing.assert_allclose(eps_hat, noise, atol=1e-4)


def _gaussian_conditional(x0: np.ndarray, x_t: np.ndarray, t: np.ndarray, sch: schedules.Schedule):
    """Mean and variance of x_{t-1} | x_t, x0 from the covariance of (x_{t-1}, x_t) given x0."""
    betas = sch.betas
    means, variances = [], []
    for i, ti in enumerate(t):
        ab_prev = float(np.prod(1 - betas[:ti]))
        alpha = 1 - betas[ti]
        m_prev, m_t = math.sqrt(ab_prev) * x0[i], math.sqrt(alpha * ab_prev) * x0[i]
        c_pp = 1 - ab_prev
        c_pt = math.sqrt(alpha) * (1 - ab_prev)
        c_tt = alpha * (1 - ab_prev) + betas[ti]
        means.append(m_prev + c_pt / c_tt * (x_t[i] - m_t))
        variances.append(c_pp - c_pt**2 / c_tt)
    return np.stack(means), np.array(variances)


@pytest.mark.parametrize("sch", [SCH, COS], ids=["linear", "cosine"])
def test_posterior_mean_and_variance_equal_gaussian_conditional(sch: schedules.Schedule) -> None:
    x0, noise, _ = _x0_noise_t((8, 5))
    t = jnp.array([0, 1, 2, 17, 400, 800, 998, 999])
    x_t = diffusion.q_sample(sch, x0, t, noise)
    mean, var, log_var = diffusion.q_posterior(sch, x0, x_t, t)
    assert mean.shape == (8, 5) and var.shape == (8, 1) and log_var.shape == (8, 1)
    ref_mean, ref_var = _gaussian_conditional(
        np.asarray(x0, np.float64), np.asarray(x_t, np.float64), np.asarray(t), sch
    )
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[:, 0], ref_var, rtol=1e-5, atol=1e-12)
    # Log variance: exact for t >= 1, clipped to t = 1's value at t = 0.
    np.testing.assert_allclose(log_var[1:, 0], np.log(ref_var[1:]), rtol=1e-6)
    np.testing.assert_allclose(log_var[0, 0], np.log(sch.posterior_variance[1]), rtol=1e-6)


def test_p_mean_variance_fixed_small_and_fixed_large() -> None:
    x0, noise, _ = _x0_noise_t((4, 6))
    t = jnp.array([0, 1, 50, 999])
    x_t = diffusion.q_sample(SCH, x0, t, noise)
    mean, var, log_var, x0_pred = diffusion.p_mean_variance(
        SCH, noise, x_t, t, prediction="eps", variance="fixed_small", clip_x0=False
    )
    ref_mean, ref_var, ref_log_var = diffusion.q_posterior(SCH, x0, x_t, t)
    np.testing.assert_allclose(x0_pred, x0, atol=1e-4)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-4)
    np.testing.assert_allclose(var, ref_var)
    np.testing.assert_allclose(log_var, ref_log_var)

    _, var_l, log_var_l, _ = diffusion.p_mean_variance(
        SCH, noise, x_t, t, prediction="eps", variance="fixed_large", clip_x0=False
    )
    expected = np.array([SCH.posterior_variance[1], SCH.betas[1], SCH.betas[50], SCH.betas[999]])
    np.testing.assert_allclose(var_l[:, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(log_var_l[:, 0], np.log(expected), rtol=1e-6)


def test_p_mean_variance_clips_x0_before_forming_the_mean() -> None:
    t = jnp.array([500, 500])
    x_t = jnp.zeros((2, 3))
    x0_out = jnp.array([[3.0, -2.0, 0.5], [0.1, -0.1, 7.0]])
    mean, _, _, x0_pred = diffusion.p_mean_variance(
        SCH, x0_out, x_t, t, prediction="x0", clip_x0=True
    )
    np.testing.assert_allclose(x0_pred, jnp.clip(x0_out, -1, 1))
    np.testing.assert_allclose(mean, SCH.posterior_mean_coef1[500] * np.clip(x0_out, -1, 1), 1e-6)


def _perfect_model(sch: schedules.Schedule, x0: jax.Array, prediction: str):
    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        eps = diffusion.predict_eps_from_x0(sch, x_t, t, x0)
        return {"eps": eps, "x0": x0, "v": diffusion.v_target(sch, x0, eps, t)}[prediction]

    return model_fn


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
@pytest.mark.parametrize("weighting", diffusion.LOSS_WEIGHTINGS)
def test_training_loss_is_zero_for_the_perfect_predictor(prediction: str, weighting: str) -> None:
    x0, _, _ = _x0_noise_t((16, 4, 4, 1))
    loss = diffusion.training_loss(
        _perfect_model(SCH, x0, prediction),
        SCH,
        x0,
        jax.random.key(3),
        prediction=prediction,
        weighting=weighting,
    )
    assert loss.shape == (16,)
    # float32 recomputation of eps from (x_t, x0): error <= ~1e-5, squared and weighted.
    assert float(jnp.max(loss)) < 1e-7


def _imperfect_loss_inputs(prediction: str):
    x0, noise, t = _x0_noise_t((64, 5))
    t = t.at[:4].set(jnp.array([0, 1, 998, 999]))
    x_t = diffusion.q_sample(SCH, x0, t, noise)
    output = jax.random.normal(jax.random.key(9), x0.shape)
    x0_pred, _ = diffusion.model_output_to_x0_eps(SCH, x_t, t, output, prediction)
    x0_err2 = np.mean(np.square(np.asarray(x0_pred, np.float64) - np.asarray(x0)), axis=1)
    snr = np.exp(SCH.log_snr[np.asarray(t)])
    return x0, noise, t, output, x0_err2, snr


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_snr_weighting_equals_snr_weighted_x0_error(prediction: str) -> None:
    x0, noise, t, output, x0_err2, snr = _imperfect_loss_inputs(prediction)
    loss = diffusion.training_loss(
        lambda x_t, tt: output,
        SCH,
        x0,
        jax.random.key(0),
        prediction=prediction,
        weighting="snr",
        t=t,
        noise=noise,
    )
    np.testing.assert_allclose(loss, snr * x0_err2, rtol=2e-3)


def test_snr_weighted_eps_loss_equals_simple_eps_loss() -> None:
    x0, noise, t, output, _, _ = _imperfect_loss_inputs("eps")
    losses = [
        diffusion.training_loss(
            lambda x_t, tt: output, SCH, x0, jax.random.key(0), weighting=w, t=t, noise=noise
        )
        for w in ("simple", "snr")
    ]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    np.testing.assert_allclose(losses[0], jnp.mean((output - noise) ** 2, axis=1), rtol=1e-6)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weighting_caps_the_snr_weight_at_gamma(prediction: str, gamma: float) -> None:
    x0, noise, t, output, x0_err2, snr = _imperfect_loss_inputs(prediction)
    loss = diffusion.training_loss(
        lambda x_t, tt: output,
        SCH,
        x0,
        jax.random.key(0),
        prediction=prediction,
        weighting="min_snr",
        min_snr_gamma=gamma,
        t=t,
        noise=noise,
    )
    np.testing.assert_allclose(loss, np.minimum(snr, gamma) * x0_err2, rtol=2e-3)
    capped = snr > gamma
    assert capped.any() and (~capped).any()


def test_loss_weights_have_closed_forms() -> None:
    snr = np.exp(SCH.log_snr)
    kw = {"min_snr_gamma": 5.0}
    w = lambda p, m: diffusion.loss_weights(SCH, prediction=p, weighting=m, **kw)
    np.testing.assert_allclose(w("eps", "simple"), 1.0)
    np.testing.assert_allclose(w("eps", "snr"), 1.0, rtol=1e-12)
    np.testing.assert_allclose(w("eps", "min_snr"), np.minimum(1.0, 5.0 / snr), rtol=1e-12)
    np.testing.assert_allclose(w("v", "snr"), SCH.alphas_cumprod, rtol=1e-12)
    np.testing.assert_allclose(w("v", "min_snr"), np.minimum(snr, 5.0) / (snr + 1), rtol=1e-12)
    np.testing.assert_allclose(w("x0", "min_snr"), np.minimum(snr, 5.0), rtol=1e-12)
    assert w("x0", "snr").dtype == np.float64


def test_label_dropout_replaces_labels_by_the_null_class_at_the_given_rate() -> None:
    seen: dict[str, jax.Array] = {}

    def model_fn(x_t: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        seen["labels"] = labels
        return x_t

    n, rate, num_classes = 20_000, 0.3, 10
    labels = jnp.arange(n, dtype=jnp.int32) % num_classes
    diffusion.training_loss(
        model_fn,
        SCH,
        jnp.zeros((n, 2)),
        jax.random.key(4),
        labels=labels,
        num_classes=num_classes,
        label_dropout=rate,
    )
    got = np.asarray(seen["labels"])
    dropped = got == num_classes
    # Binomial(n, 0.3): 5 standard deviations = 0.016.
    assert abs(dropped.mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
    np.testing.assert_array_equal(got[~dropped], np.asarray(labels)[~dropped])

    diffusion.training_loss(model_fn, SCH, jnp.zeros((8, 2)), jax.random.key(4), labels=labels[:8])
    np.testing.assert_array_equal(seen["labels"], labels[:8])


def test_training_loss_samples_t_over_all_timesteps_and_jits() -> None:
    seen: dict[str, jax.Array] = {}

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        seen["t"] = t
        return jnp.zeros_like(x_t)

    sch = schedules.get_schedule("cosine", 10)
    x0, rng = jnp.zeros((4000, 3, 2)), jax.random.key(0)
    loss = diffusion.training_loss(model_fn, sch, x0, rng)
    t = np.asarray(seen["t"])
    jitted = jax.jit(lambda x, r: diffusion.training_loss(model_fn, sch, x, r))(x0, rng)
    np.testing.assert_allclose(jitted, loss, rtol=1e-6)
    assert loss.shape == (4000,)
    assert t.dtype == np.int32 and set(t.tolist()) == set(range(10))
    # Zero output vs eps target: loss = mean(noise^2), about 1.
    assert abs(float(loss.mean()) - 1.0) < 0.05


def test_bad_loss_options_raise_value_errors_naming_the_choices() -> None:
    x0 = jnp.zeros((2, 3))
    model = lambda x, t, *labels: x
    rng = jax.random.key(0)
    with pytest.raises(ValueError, match=r"unknown prediction 'score'.*\('eps', 'x0', 'v'\)"):
        diffusion.training_loss(model, SCH, x0, rng, prediction="score")
    with pytest.raises(
        ValueError, match=r"unknown loss weighting 'p2'.*'simple', 'snr', 'min_snr'"
    ):
        diffusion.training_loss(model, SCH, x0, rng, weighting="p2")
    with pytest.raises(ValueError, match="label_dropout > 0 needs labels and num_classes"):
        diffusion.training_loss(model, SCH, x0, rng, labels=jnp.zeros(2, int), label_dropout=0.1)
    with pytest.raises(ValueError, match=r"label_dropout must be in \[0, 1\]"):
        diffusion.training_loss(model, SCH, x0, rng, label_dropout=1.5)
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        diffusion.training_loss(model, SCH, x0, rng, weighting="min_snr", min_snr_gamma=0.0)
    with pytest.raises(ValueError, match=r"unknown variance 'learned'.*'fixed_small'"):
        diffusion.p_mean_variance(SCH, x0, x0, jnp.zeros(2, int), variance="learned")
