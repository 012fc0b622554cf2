"""KL, discretised decoder likelihood and bits/dim against closed forms and a float64 numpy
brute force of the whole bound."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from diffusion_jax import diffusion, likelihood, schedules

BINS = np.arange(256) / 127.5 - 1.0  # the 256 data levels 2k / 255 - 1


def _digit_like_x0(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Data on the 256-level grid, both edge levels included."""
    k = np.random.default_rng(seed).integers(0, 256, size=shape)
    k.flat[0], k.flat[1] = 0, 255
    return (k / 127.5 - 1.0).astype(np.float32)


@pytest.mark.parametrize(
    "m1, s1, m2, s2", [(0.3, 0.5, -0.2, 1.3), (1.0, 2.0, 1.0, 0.25), (-3.0, 0.1, 2.0, 4.0)]
)
def test_normal_kl_equals_the_integral_of_p_log_p_over_q(m1, s1, m2, s2) -> None:
    p, q = stats.norm(m1, s1), stats.norm(m2, s2)
    expected, _ = integrate.quad(
        lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), m1 - 12 * s1, m1 + 12 * s1
    )
    got = diffusion.normal_kl(m1, 2 * np.log(s1), m2, 2 * np.log(s2))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_normal_kl_of_equal_distributions_is_exactly_zero() -> None:
    mean = jnp.array([-1.0, 0.0, 0.7])
    logvar = jnp.array([-9.0, 0.0, 2.5])
    assert np.all(np.asarray(diffusion.normal_kl(mean, logvar, mean, logvar)) == 0.0)


@pytest.mark.parametrize("mean", [-1.3, -1.0, -0.004, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("scale", [1e-4, 0.01, 0.3, 5.0])
def test_discretized_likelihood_sums_to_one_over_the_256_levels(mean, scale) -> None:
    log_p = diffusion.discretized_gaussian_log_likelihood(
        jnp.asarray(BINS, jnp.float32), jnp.float32(mean), jnp.float32(np.log(scale))
    )
    assert np.all(np.isfinite(log_p)) and np.all(np.asarray(log_p) <= 0.0)
    np.testing.assert_allclose(np.sum(np.exp(np.asarray(log_p, np.float64))), 1.0, atol=2e-5)


@pytest.mark.parametrize("mean, scale", [(0.1, 0.05), (0.9, 0.002), (-1.0, 0.01), (0.0, 1.0)])
def test_discretized_likelihood_equals_gaussian_mass_of_each_bin_in_the_tails_too(
    mean, scale
) -> None:
    edges = np.concatenate([[-np.inf], (BINS[:-1] + BINS[1:]) / 2, [np.inf]])
    dist = stats.norm(mean, scale)
    # log of the bin mass, computed in whichever tail keeps its digits (float64); the other
    # tail's form may be log(0), and is not selected
    with np.errstate(divide="ignore"):
        left = dist.logcdf(edges[1:]) + np.log(
            -np.expm1(dist.logcdf(edges[:-1]) - dist.logcdf(edges[1:]))
        )
        right = dist.logsf(edges[:-1]) + np.log(
            -np.expm1(dist.logsf(edges[1:]) - dist.logsf(edges[:-1]))
        )
    expected = np.where(BINS < mean, left, right)
    got = diffusion.discretized_gaussian_log_likelihood(
        jnp.asarray(BINS, jnp.float32), jnp.float32(mean), jnp.float32(np.log(scale))
    )
    # bins up to ~1e5 nats deep in the tail: relative accuracy, not underflow to -inf
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-4)


def test_discretized_likelihood_gradient_is_finite_far_in_the_tails() -> None:
    def total(mean: jax.Array, log_scale: jax.Array) -> jax.Array:
        x = jnp.asarray(BINS, jnp.float32)
        return jnp.sum(diffusion.discretized_gaussian_log_likelihood(x, mean, log_scale))

    for mean, log_scale in [(0.9, -8.0), (-0.3, -12.0), (0.0, 4.0)]:
        grads = jax.grad(total, argnums=(0, 1))(jnp.float32(mean), jnp.float32(log_scale))
        assert all(np.isfinite(g) for g in grads)


def _oracle_x0_model(x0: jax.Array):
    """model_fn returning the true clean image (an x0 prediction)."""
    return lambda x_t, t: jnp.broadcast_to(x0, x_t.shape)


def test_oracle_model_has_zero_kl_terms_and_only_prior_plus_decoder_left() -> None:
    sch = schedules.get_schedule("cosine", 50)
    x0 = jnp.asarray(_digit_like_x0((3, 4, 4, 1)))
    out = likelihood.bits_per_dim(
        _oracle_x0_model(x0), sch, x0, jax.random.key(0), prediction="x0", variance="fixed_small"
    )
    assert out["terms"].shape == (50, 3) and out["total"].shape == out["prior"].shape == (3,)
    assert np.all(np.asarray(out["terms"][1:]) == 0.0)
    np.testing.assert_allclose(out["total"], out["prior"] + out["terms"][0], rtol=1e-6)
    np.testing.assert_allclose(out["prior"], _prior_bpd_numpy(sch, np.asarray(x0)), rtol=1e-4)
    assert np.all(np.asarray(out["terms"][0]) > 0.0)


def test_a_deliberately_bad_model_needs_more_bits_than_the_oracle() -> None:
    sch = schedules.get_schedule("cosine", 50)
    x0 = jnp.asarray(_digit_like_x0((4, 4, 4, 1)))
    rng = jax.random.key(1)
    good = likelihood.bits_per_dim(_oracle_x0_model(x0), sch, x0, rng, prediction="x0")
    bad = likelihood.bits_per_dim(lambda x_t, t: jnp.zeros_like(x_t), sch, x0, rng, prediction="x0")
    assert np.all(np.asarray(bad["total"]) > np.asarray(good["total"]) + 0.5)


def test_bits_per_dim_of_an_example_does_not_depend_on_its_batch() -> None:
    sch = schedules.get_schedule("linear", 8)
    x0 = jnp.asarray(_digit_like_x0((3, 2, 2, 1)))
    model = lambda x_t, t: 0.5 * x_t
    rng = jax.random.key(2)
    whole = likelihood.bits_per_dim(model, sch, x0, rng, prediction="eps")["total"]
    part = likelihood.bits_per_dim(
        model, sch, x0[2:], rng, prediction="eps", example_ids=jnp.array([2])
    )["total"]
    np.testing.assert_allclose(part, whole[2:], rtol=1e-6)


# ------------------------------------------------------------------------------------------
# float64 numpy brute force of the whole bound on T = 4.


def _prior_bpd_numpy(sch: schedules.Schedule, x0: np.ndarray) -> np.ndarray:
    ab = sch.alphas_cumprod[-1]
    mean, var = np.sqrt(ab) * x0.astype(np.float64), 1.0 - ab
    kl = 0.5 * (-1.0 - np.log(var) + var + mean**2)
    return kl.reshape(len(x0), -1).mean(axis=1) / np.log(2.0)


def _decoder_nll_numpy(x0: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    lo = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
    hi = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
    mass = stats.norm.cdf(hi, mean, std) - stats.norm.cdf(lo, mean, std)
    return -np.log(mass)


def _bound_numpy(sch, model_np, x0, noises, prediction, variance):
    """float64: prior + sum_t L_t with x_t from the given noise (T, B, ...)."""
    x0 = x0.astype(np.float64)
    b = len(x0)
    total = _prior_bpd_numpy(sch, x0)
    for t in range(sch.num_timesteps):
        ab, ab_prev, beta = sch.alphas_cumprod[t], sch.alphas_cumprod_prev[t], sch.betas[t]
        x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noises[t]
        out = model_np(x_t, t)
        pred, v = (out[..., :1], out[..., 1:]) if variance == "learned_range" else (out, None)
        x0_hat = (x_t - np.sqrt(1 - ab) * pred) / np.sqrt(ab) if prediction == "eps" else pred
        x0_hat = np.clip(x0_hat, -1, 1)
        c_x0 = np.sqrt(ab_prev) * beta / (1 - ab)
        c_xt = np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        post_var = beta * (1 - ab_prev) / (1 - ab)
        clipped = post_var if t > 0 else sch.posterior_variance[1]
        if variance == "fixed_small":
            model_var = np.full_like(x_t, clipped)
        elif variance == "fixed_large":
            model_var = np.full_like(x_t, beta if t > 0 else sch.posterior_variance[1])
        else:
            frac = (v + 1) / 2
            model_var = np.exp(frac * np.log(beta) + (1 - frac) * np.log(clipped))
        mean = c_x0 * x0_hat + c_xt * x_t
        if t == 0:
            per_dim = _decoder_nll_numpy(x0, mean, np.sqrt(model_var))
        else:
            per_dim = 0.5 * (
                np.log(model_var / post_var)
                + (post_var + (c_x0 * x0 + c_xt * x_t - mean) ** 2) / model_var
                - 1
            )
        total = total + per_dim.reshape(b, -1).mean(axis=1) / np.log(2.0)
    return total


@pytest.mark.parametrize(
    "prediction, variance",
    [
        ("eps", "fixed_small"),
        ("eps", "fixed_large"),
        ("x0", "fixed_small"),
        ("eps", "learned_range"),
    ],
)
def test_bits_per_dim_equals_a_float64_numpy_brute_force_on_four_timesteps(
    prediction, variance
) -> None:
    sch = schedules.get_schedule("cosine", 4)
    x0 = _digit_like_x0((3, 3, 3, 1), seed=5)
    rng = jax.random.key(11)

    def model_np(x_t: np.ndarray, t: int) -> np.ndarray:
        pred = np.tanh(0.8 * x_t + 0.05 * t) if prediction == "x0" else 0.6 * x_t - 0.1 * t
        if variance != "learned_range":
            return pred
        return np.concatenate([pred, np.sin(3 * x_t) * 0.9], axis=-1)  # v in [-0.9, 0.9]

    def model_jax(x_t: jax.Array, t: jax.Array) -> jax.Array:
        tt = t.astype(jnp.float32)[:, None, None, None]
        pred = jnp.tanh(0.8 * x_t + 0.05 * tt) if prediction == "x0" else 0.6 * x_t - 0.1 * tt
        if variance != "learned_range":
            return pred
        return jnp.concatenate([pred, jnp.sin(3 * x_t) * 0.9], axis=-1)

    # The documented noise: example i at t from fold_in(fold_in(rng, i), t).
    noises = np.stack(
        [
            np.stack(
                [
                    np.asarray(
                        jax.random.normal(
                            jax.random.fold_in(jax.random.fold_in(rng, i), t), x0.shape[1:]
                        ),
                        np.float64,
                    )
                    for i in range(len(x0))
                ]
            )
            for t in range(4)
        ]
    )
    out = jax.jit(
        lambda x: likelihood.bits_per_dim(
            model_jax, sch, x, rng, prediction=prediction, variance=variance
        )
    )(jnp.asarray(x0))
    expected = _bound_numpy(sch, model_np, x0, noises, prediction, variance)
    np.testing.assert_allclose(out["total"], expected, rtol=2e-4)
    np.testing.assert_allclose(out["total"], out["prior"] + out["terms"].sum(axis=0), rtol=1e-6)


def test_bits_per_dim_refuses_unknown_options() -> None:
    sch = schedules.get_schedule("linear", 4)
    x0 = jnp.zeros((2, 2, 2, 1))
    with pytest.raises(ValueError, match=r"unknown variance 'learned'.*'learned_range'"):
        likelihood.bits_per_dim(
            lambda x, t: x, sch, x0, jax.random.key(0), prediction="eps", variance="learned"
        )
    with pytest.raises(ValueError, match=r"example_ids must have shape \(2,\)"):
        likelihood.bits_per_dim(
            lambda x, t: x, sch, x0, jax.random.key(0), prediction="eps", example_ids=jnp.zeros(3)
        )
