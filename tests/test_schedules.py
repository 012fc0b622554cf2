"""Schedules: closed forms in float64, posterior coefficients from the joint Gaussian, registry."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from diffusion_jax import samplers, schedules
from diffusion_jax.testing import gaussian_oracle

FIELDS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "log_snr",
)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("num_timesteps", [1, 2, 7, 50, 1000, 4000])
def test_all_fields_are_float64_arrays_of_length_T(name: str, num_timesteps: int) -> None:
    sch = schedules.get_schedule(name, num_timesteps)
    assert sch.num_timesteps == num_timesteps
    for field in FIELDS:
        value = getattr(sch, field)
        assert isinstance(value, np.ndarray), field
        assert value.dtype == np.float64, field
        assert value.shape == (num_timesteps,), field
        assert np.all(np.isfinite(value)), field
    assert np.all((sch.betas > 0) & (sch.betas <= schedules.MAX_BETA))


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("num_timesteps", [1, 10, 1000])
def test_derived_fields_match_their_closed_forms(name: str, num_timesteps: int) -> None:
    sch = schedules.get_schedule(name, num_timesteps)
    ab = np.cumprod(1.0 - sch.betas)
    np.testing.assert_allclose(sch.alphas_cumprod, ab, rtol=1e-15, atol=0)
    np.testing.assert_allclose(sch.alphas_cumprod_prev, np.append(1.0, ab[:-1]), rtol=1e-15)
    np.testing.assert_allclose(sch.sqrt_alphas_cumprod, np.sqrt(ab), rtol=1e-15)
    # 1 - ab is formed without cancellation: full float64 precision even at t = 0.
    one_minus_ab = -np.expm1(np.cumsum(np.log1p(-sch.betas)))
    np.testing.assert_allclose(sch.sqrt_one_minus_alphas_cumprod, np.sqrt(one_minus_ab), rtol=1e-14)
    # ... and agrees with 1 - cumprod(1 - betas) up to cumprod's own rounding (~T ulp).
    np.testing.assert_allclose(sch.sqrt_one_minus_alphas_cumprod**2, 1 - ab, rtol=0, atol=1e-13)
    np.testing.assert_allclose(sch.log_snr, np.log(ab / (1 - ab)), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(sch.sqrt_recip_alphas_cumprod * sch.sqrt_alphas_cumprod, 1.0)


def _posterior_from_joint_gaussian(sch: schedules.Schedule, t: int) -> tuple[float, float, float]:
    """(coef on x0, coef on x_t, variance) of x_{t-1} | x_t, x0 by Gaussian conditioning.

    Given x0: x_{t-1} = sqrt(ab_{t-1}) x0 + sqrt(1 - ab_{t-1}) e1 and
    x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) e2, so (x_{t-1}, x_t) is jointly Gaussian.
    """
    ab_prev = 1.0 if t == 0 else float(np.prod(1.0 - sch.betas[:t]))
    alpha = 1.0 - sch.betas[t]
    mean = np.array([math.sqrt(ab_prev), math.sqrt(alpha * ab_prev)])  # per unit of x0
    cov = np.array(
        [
            [1.0 - ab_prev, math.sqrt(alpha) * (1.0 - ab_prev)],
            [math.sqrt(alpha) * (1.0 - ab_prev), alpha * (1.0 - ab_prev) + sch.betas[t]],
        ]
    )
    gain = cov[0, 1] / cov[1, 1]
    coef_xt = gain
    coef_x0 = mean[0] - gain * mean[1]
    variance = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
    return coef_x0, coef_xt, variance


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_coefficients_equal_gaussian_conditioning(name: str) -> None:
    sch = schedules.get_schedule(name, 1000)
    for t in [0, 1, 2, 10, 500, 998, 999]:
        coef_x0, coef_xt, variance = _posterior_from_joint_gaussian(sch, t)
        np.testing.assert_allclose(sch.posterior_mean_coef1[t], coef_x0, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(sch.posterior_mean_coef2[t], coef_xt, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(sch.posterior_variance[t], variance, rtol=1e-9, atol=1e-14)
    # t = 0: x_{-1} is x0 itself.
    assert sch.posterior_mean_coef1[0] == pytest.approx(1.0, abs=1e-15)
    assert sch.posterior_mean_coef2[0] == 0.0 and sch.posterior_variance[0] == 0.0
    np.testing.assert_allclose(
        sch.posterior_log_variance_clipped,
        np.log(np.append(sch.posterior_variance[1], sch.posterior_variance[1:])),
    )


def test_fixed_large_variance_is_betas_with_first_entry_posterior_variance() -> None:
    sch = schedules.get_schedule("linear", 1000)
    assert sch.large_variance[0] == sch.posterior_variance[1]
    np.testing.assert_array_equal(sch.large_variance[1:], sch.betas[1:])
    np.testing.assert_allclose(sch.large_log_variance, np.log(sch.large_variance))


def test_linear_endpoints_are_ho_et_al_values() -> None:
    sch = schedules.get_schedule("linear", 1000)
    assert sch.betas[0] == pytest.approx(1e-4, rel=1e-15)
    assert sch.betas[-1] == pytest.approx(0.02, rel=1e-15)
    np.testing.assert_allclose(np.diff(sch.betas), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_linear_scales_with_1000_over_T() -> None:
    betas = schedules.get_schedule("linear", 250).betas
    assert betas[0] == pytest.approx(4e-4, rel=1e-14)
    assert betas[-1] == pytest.approx(0.08, rel=1e-14)
    # Below T = 21 the scaled betas would reach 1; they are capped.
    assert schedules.get_schedule("linear", 10).betas.max() == schedules.MAX_BETA


@pytest.mark.parametrize("num_timesteps", [10, 1000, 4000])
def test_cosine_alphas_cumprod_matches_nichol_dhariwal(num_timesteps: int) -> None:
    sch = schedules.get_schedule("cosine", num_timesteps)
    s, T = 0.008, num_timesteps
    f = lambda t: np.cos(((t / T) + s) / (1 + s) * np.pi / 2) ** 2
    t = np.arange(1, T + 1, dtype=np.float64)  # our index t - 1
    uncapped = sch.betas < schedules.MAX_BETA
    # Once a beta is capped, later alphas_cumprod differ; only the last beta is capped here.
    assert np.all(uncapped[:-1]) and not uncapped[-1]
    np.testing.assert_allclose(sch.alphas_cumprod[uncapped], (f(t) / f(0.0))[uncapped], rtol=1e-12)
    assert np.all(sch.betas <= 0.999)


def test_register_schedule_makes_a_name_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schedules, "_REGISTRY", dict(schedules._REGISTRY))

    @schedules.register_schedule("constant_test")
    def _constant(num_timesteps: int) -> np.ndarray:
        return np.full(num_timesteps, 0.01)

    assert "constant_test" in schedules.available_schedules()
    sch = schedules.get_schedule("constant_test", 5)
    np.testing.assert_allclose(sch.alphas_cumprod, 0.99 ** np.arange(1, 6), rtol=1e-15)
    with pytest.raises(ValueError, match="already registered"):
        schedules.register_schedule("constant_test")(_constant)


def test_unknown_schedule_name_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown schedule 'cosin'.*'cosine'.*'linear'"):
        schedules.get_schedule("cosin")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_timesteps_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="num_timesteps must be an integer >= 1"):
        schedules.get_schedule("linear", bad)  # type: ignore[arg-type]


def test_registered_fn_returning_bad_betas_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schedules, "_REGISTRY", dict(schedules._REGISTRY))
    schedules.register_schedule("too_big")(lambda n: np.full(n, 1.0))
    schedules.register_schedule("wrong_len")(lambda n: np.full(n + 1, 0.1))
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        schedules.get_schedule("too_big", 4)
    with pytest.raises(ValueError, match=r"shape \(5,\); expected \(4,\)"):
        schedules.get_schedule("wrong_len", 4)


def test_schedule_is_a_pytree_usable_as_a_jit_argument() -> None:
    sch = schedules.get_schedule("linear", 100)
    leaves = jax.tree_util.tree_leaves(sch)
    assert len(leaves) == len(sch.__dataclass_fields__)
    total = jax.jit(lambda s: s.alphas_cumprod.sum())(sch)
    np.testing.assert_allclose(total, sch.alphas_cumprod.sum(), rtol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_zero_terminal_snr_makes_the_last_step_pure_noise_and_keeps_the_first(name: str) -> None:
    plain = schedules.get_schedule(name, 1000)
    zero = schedules.get_schedule(name, 1000, zero_terminal_snr=True)
    assert 0 < zero.alphas_cumprod[-1] <= schedules.ZERO_TERMINAL_ALPHA_BAR  # SNR <= 6e-8
    assert zero.alphas_cumprod[0] == pytest.approx(plain.alphas_cumprod[0], rel=1e-12)
    assert np.all(np.diff(zero.alphas_cumprod) < 0)
    assert np.all(np.isfinite(zero.sqrt_recip_alphas_cumprod)) and np.all(np.isfinite(zero.log_snr))
    # Lin et al.'s algorithm 1: sqrt(ab) shifted by its last value and scaled to keep the first.
    s = np.sqrt(plain.alphas_cumprod)
    expected = (s - s[-1]) * s[0] / (s[0] - s[-1])
    np.testing.assert_allclose(np.sqrt(zero.alphas_cumprod[:-1]), expected[:-1], rtol=1e-10)


def test_zero_terminal_snr_v_model_samples_gaussian_data_from_pure_noise() -> None:
    # The optimal v model of N(0.3, 0.5^2) data on the rescaled schedule: ddim samples have the
    # data's moments (16384 pixels: standard errors 0.004 / 0.003).
    sch = schedules.get_schedule("linear", 1000, zero_terminal_snr=True)
    x = samplers.sample(
        gaussian_oracle.optimal_model(sch, 0.3, 0.5, "v"),
        sch,
        (64, 256),
        jax.random.key(0),
        sampler="ddim",
        num_steps=100,
        prediction="v",
        clip_x0=False,
    )
    x = np.asarray(x, np.float64)
    assert abs(x.mean() - 0.3) < 0.025 and abs(x.std() - 0.5) < 0.025
