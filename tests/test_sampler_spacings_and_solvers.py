"""Sigma-space timestep spacings, DPM-Solver++(3M) and (2M) SDE, and the Gaussian start, on
exact Gaussian data (optimal model and probability-flow ODE in closed form)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from diffusion_jax import formulations, samplers, schedules
from diffusion_jax.data_gaussian import DataGaussian
from diffusion_jax.samplers import dpm_solver
from diffusion_jax.testing import gaussian_oracle

MU, S = 0.3, 0.5
X_T = np.linspace(-3.0, 3.0, 64).reshape(2, 32)


def _geometric_sigma_schedule(num_timesteps: int = 1000) -> schedules.Schedule:
    """sigma_t geometric from 0.002 to 80 (log sigma uniform in t): every timestep is a small
    step in log-SNR, so a solver's order is not hidden by a coarse end of the discrete chain
    (on 'linear' and 'cosine' sigma doubles from t = 0 to t = 1, whatever N)."""
    sigma = 0.002 * (80 / 0.002) ** (np.arange(num_timesteps) / (num_timesteps - 1))
    ab = 1.0 / (1.0 + sigma**2)
    return schedules.schedule_from_betas(1.0 - ab / np.append(1.0, ab[:-1]))


def _ode_error(sampler: str, num_steps: int, sch: schedules.Schedule, **kwargs: Any) -> float:
    """Max abs error vs the exact PF-ODE solution from the chain's first timestep."""
    return gaussian_oracle.ode_error(sampler, num_steps, sch, X_T, MU, S, **kwargs)


# --------------------------------------------------------------------------- spacings


@pytest.mark.parametrize("spacing", ["karras", "logsnr"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sigma_spacings_visit_the_timesteps_nearest_their_target_sigmas(
    spacing: str, schedule: str
) -> None:
    sch = schedules.get_schedule(schedule, 1000)
    sigma = np.sqrt((1 - sch.alphas_cumprod) / sch.alphas_cumprod)
    n, rho, sigma_max = 10, 7.0, 80.0
    ts = samplers.get_timesteps(1000, n, spacing, alphas_cumprod=sch.alphas_cumprod)
    hi, lo = min(sigma_max, sigma[-1]), sigma[0]
    u = np.linspace(0, 1, n)
    if spacing == "karras":  # Karras et al. 2022, eq. 5
        targets = (hi ** (1 / rho) + u * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    else:
        targets = hi * (lo / hi) ** u
    for t, target in zip(ts, targets, strict=True):
        # No other timestep is nearer the target in log sigma.
        distance = np.abs(np.log(sigma) - np.log(target))
        assert distance[t] == distance.min(), (t, target)
    assert ts[-1] == 0 and sigma[ts[0]] == pytest.approx(80.0, rel=0.02)


def test_sigma_spacings_honour_sigma_max_and_rho() -> None:
    ab = schedules.get_schedule("cosine", 1000).alphas_cumprod
    sigma = np.sqrt((1 - ab) / ab)
    low = samplers.get_timesteps(1000, 20, "karras", alphas_cumprod=ab, sigma_max=5.0)
    assert sigma[low[0]] == pytest.approx(5.0, rel=0.02)
    dense_low = samplers.get_timesteps(1000, 20, "karras", alphas_cumprod=ab, rho=12.0)
    default = samplers.get_timesteps(1000, 20, "karras", alphas_cumprod=ab)
    assert np.sum(dense_low < 100) > np.sum(default < 100)  # larger rho: denser at low noise
    # Above the schedule's own largest sigma the chain starts at T - 1.
    top = samplers.get_timesteps(1000, 20, "logsnr", alphas_cumprod=ab, sigma_max=1e9)
    assert top[0] == 999


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma_max": 0.0}, r"sigma_max must be a finite number > 0"),
        ({"rho": float("inf")}, r"rho must be a finite number > 0"),
        ({}, r"'karras' needs the schedule's alphas_cumprod"),
    ],
)
def test_bad_sigma_spacing_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        samplers.get_timesteps(1000, 10, "karras", **kwargs)


def test_sigma_spacings_need_a_concrete_schedule() -> None:
    sch = schedules.get_schedule("linear", 100)

    def fn(sch: schedules.Schedule) -> jax.Array:
        model = gaussian_oracle.optimal_model(sch, MU, S)
        return samplers.sample(model, sch, (2, 3), jax.random.key(0), timestep_spacing="karras")

    with pytest.raises(ValueError, match=r"close over the schedule"):
        jax.jit(fn)(sch)


# (sampler, extra options, spacing, expected order); measured slopes 0.91-0.97 (ddim),
# 2.04-2.23 (heun), 1.34-2.16 (pure 2M, reaching 2 from ~20 steps), 3.09-3.74 (pure 3M, karras;
# on logsnr, whose steps are uniform in log-SNR, 3.4-4.2).
ORDER_CASES = [
    ("ddim", {}, "karras", (10, 20, 40, 80), 1.0),
    ("ddim", {}, "logsnr", (10, 20, 40, 80), 1.0),
    ("heun", {}, "karras", (10, 20, 40, 80), 2.0),
    ("heun", {}, "logsnr", (10, 20, 40, 80), 2.0),
    ("dpm_solver++", {"lower_order_final": False}, "karras", (20, 40, 80), 2.0),
    ("dpm_solver++", {"lower_order_final": False}, "logsnr", (20, 40, 80), 2.0),
    ("dpm_solver++3m", {"lower_order_final": False}, "karras", (20, 40, 80), 3.0),
]


@pytest.mark.parametrize(("sampler", "options", "spacing", "intervals", "order"), ORDER_CASES)
def test_ode_samplers_converge_at_their_order_on_the_sigma_spacings(
    sampler: str, options: dict[str, Any], spacing: str, intervals: tuple[int, ...], order: float
) -> None:
    sch = _geometric_sigma_schedule()
    errors = np.array(
        [_ode_error(sampler, n + 1, sch, timestep_spacing=spacing, **options) for n in intervals]
    )
    slopes = -np.diff(np.log(errors)) / np.log(2)
    # At least the order; not clearly above it (which would mean the order is mislabelled).
    assert np.all(slopes[-2:] > order - 0.25), (errors, slopes)
    assert np.all(slopes[-2:] < order + 0.8), (errors, slopes)


# --------------------------------------------------------------------------- DPM-Solver++(3M), SDE


def _exponential_integral(lam_s: float, lam_t: float, d_of_lambda: Any) -> float:
    """int_{lam_s}^{lam_t} e^lam D(lam) dlam by Gauss-Legendre quadrature (exact here)."""
    nodes, weights = np.polynomial.legendre.leggauss(20)
    lam = 0.5 * (lam_t - lam_s) * nodes + 0.5 * (lam_t + lam_s)
    return float(0.5 * (lam_t - lam_s) * np.sum(weights * np.exp(lam) * d_of_lambda(lam)))


def test_3m_updates_are_exact_when_x0_is_quadratic_in_log_snr() -> None:
    # x_{k+1} = sigma_{k+1} / sigma_k x_k + sigma_{k+1} int e^lam D(lam) dlam exactly (the
    # exponential integrator of the data-prediction ODE); a third-order update interpolates D
    # through 3 points, so it is exact for quadratic D. (2M's midpoint update is second order
    # without being exact for linear D, so it has no such test.)
    max_order, degree = 3, 2
    ab = schedules.get_schedule("cosine", 1000).alphas_cumprod[[900, 700, 500, 350, 200, 90, 30]]
    alpha, sigma, h = dpm_solver.log_snr_steps(np.sqrt((1 - ab) / ab))
    a, b, c, e = dpm_solver.multistep_coefficients(
        alpha, sigma, h, lower_order_final=False, max_order=3
    )
    np.testing.assert_allclose(alpha, np.sqrt(ab), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.sqrt(1 - ab), rtol=1e-12)
    lam = np.log(alpha / sigma)
    np.testing.assert_allclose(h, np.diff(lam), rtol=1e-12)
    coeffs = np.array([0.3, -0.2, 0.05])[: degree + 1]
    d = np.polynomial.polynomial.polyval(lam, coeffs)
    x = 0.7
    orders = dpm_solver.step_orders(len(ab) - 1, max_order, lower_order_final=False)
    for k in range(len(ab) - 1):
        exact = sigma[k + 1] / sigma[k] * x + sigma[k + 1] * _exponential_integral(
            lam[k], lam[k + 1], lambda v: np.polynomial.polynomial.polyval(v, coeffs)
        )
        d_prev = d[k - 1] if k >= 1 else 0.0
        d_prev2 = d[k - 2] if k >= 2 else 0.0
        update = a[k] * x + b[k] * d[k] + c[k] * d_prev + e[k] * d_prev2
        if orders[k] == max_order:
            assert update == pytest.approx(exact, rel=1e-10, abs=1e-12), k
        x = exact


def test_step_orders_climb_with_the_history_and_drop_at_the_end() -> None:
    np.testing.assert_array_equal(dpm_solver.step_orders(6, 3, False), [1, 2, 3, 3, 3, 3])
    np.testing.assert_array_equal(dpm_solver.step_orders(6, 3, True), [1, 2, 3, 3, 2, 1])
    np.testing.assert_array_equal(dpm_solver.step_orders(4, 2, True), [1, 2, 2, 1])


def test_dpm_solver_3m_beats_2m_on_logsnr_steps() -> None:
    # Measured on 'cosine', logsnr spacing (max error): 3M 0.011 / 0.0028 at N = 21 / 41,
    # 2M (both with lower_order_final) 0.018 / 0.0055.
    sch = schedules.get_schedule("cosine", 1000)
    for n in (21, 41):
        err_3m = _ode_error("dpm_solver++3m", n, sch, timestep_spacing="logsnr")
        err_2m = _ode_error("dpm_solver++", n, sch, timestep_spacing="logsnr")
        assert err_3m < 0.75 * err_2m, (n, err_3m, err_2m)


def test_dpm_solver_3m_with_two_updates_is_2m() -> None:
    # Orders 1 then (lower_order_final) 1: both equal DDIM-like updates; with 3 timesteps and no
    # lower_order_final, 3M's second update is second order exactly as 2M's.
    sch = schedules.get_schedule("linear", 1000)
    args = (gaussian_oracle.optimal_model(sch, MU, S), sch, (4, 16), jax.random.key(5))
    for lower_order_final in (True, False):
        two = samplers.sample(
            *args, sampler="dpm_solver++", num_steps=3, lower_order_final=lower_order_final
        )
        three = samplers.sample(
            *args, sampler="dpm_solver++3m", num_steps=3, lower_order_final=lower_order_final
        )
        np.testing.assert_allclose(three, two, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_steps", [50, 200])
def test_dpm_solver_sde_samples_have_the_data_mean_and_std(num_steps: int) -> None:
    # 16384 i.i.d. pixels: standard errors 0.004 (mean), 0.003 (std); tolerance 5 of them plus
    # a discretisation bias of at most 0.01 at 50 steps.
    sch = schedules.get_schedule("linear", 1000)
    x = samplers.sample(
        gaussian_oracle.optimal_model(sch, MU, S),
        sch,
        (64, 256),
        jax.random.key(1),
        sampler="dpm_solver++2m_sde",
        num_steps=num_steps,
        clip_x0=False,
    )
    x = np.asarray(x, np.float64)
    assert abs(x.mean() - MU) < 5 * 0.0039 + 0.01
    assert abs(x.std() - S) < 5 * 0.0028 + 0.01


def test_dpm_solver_sde_noise_depends_on_the_seed_and_scales_with_temperature() -> None:
    sch = schedules.get_schedule("linear", 1000)
    args = (gaussian_oracle.optimal_model(sch, MU, S), sch, (4, 16))
    kwargs = {"sampler": "dpm_solver++2m_sde", "num_steps": 20, "x_init": jnp.zeros((4, 16))}
    a = samplers.sample(*args, jax.random.key(0), **kwargs)
    b = samplers.sample(*args, jax.random.key(1), **kwargs)
    cold = samplers.sample(*args, jax.random.key(0), temperature=0.0, **kwargs)
    cold_b = samplers.sample(*args, jax.random.key(1), temperature=0.0, **kwargs)
    assert float(jnp.max(jnp.abs(a - b))) > 0.1
    np.testing.assert_array_equal(cold, cold_b)  # no injected noise left: same x_T, same path


# --------------------------------------------------------------------------- Gaussian start


def _random_gaussian(dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(dim, dim)) * 0.15
    return rng.normal(size=dim) * 0.3, factor @ factor.T + 0.01 * np.eye(dim)


def _reference_flow(
    x: np.ndarray, mean: np.ndarray, cov: np.ndarray, ab_from: float, ab_to: float
) -> np.ndarray:
    """float64: the PF-ODE map of N(mean, cov) data by matrix square roots (no eigenbasis)."""
    eye = np.eye(len(mean))
    s_from = scipy.linalg.sqrtm(ab_from * cov + (1 - ab_from) * eye).real
    s_to = scipy.linalg.sqrtm(ab_to * cov + (1 - ab_to) * eye).real
    gain = s_to @ np.linalg.inv(s_from)
    return np.sqrt(ab_to) * mean + (x - np.sqrt(ab_from) * mean) @ gain.T


def test_data_gaussian_fit_recovers_the_mean_and_covariance() -> None:
    mean, cov = _random_gaussian()
    x = np.random.default_rng(1).multivariate_normal(mean, cov, size=4000).reshape(-1, 4, 4, 1)
    g = DataGaussian.fit(x)
    fitted = g.eigvecs @ np.diag(g.eigvals) @ g.eigvecs.T
    np.testing.assert_allclose(g.mean, x.reshape(len(x), -1).mean(0), atol=1e-12)
    np.testing.assert_allclose(fitted, np.cov(x.reshape(len(x), -1), rowvar=False, bias=True))
    with pytest.raises(ValueError, match=r"need >= 2 finite images"):
        DataGaussian.fit(np.full((3, 2), np.nan))


def _exact_gaussian(dim: int = 16) -> tuple[DataGaussian, np.ndarray, np.ndarray]:
    mean, cov = _random_gaussian(dim)
    eigvals, eigvecs = np.linalg.eigh(cov)
    return DataGaussian(mean=mean, eigvals=eigvals, eigvecs=eigvecs), mean, cov


def test_data_gaussian_flow_and_denoiser_match_their_closed_forms() -> None:
    g, mean, cov = _exact_gaussian()
    ab = schedules.get_schedule("cosine", 1000).alphas_cumprod
    x = np.random.default_rng(2).normal(size=(5, 16))
    with jax.enable_x64(True):
        flowed = np.asarray(g.flow(jnp.asarray(x), ab[999], ab[300]))
        np.testing.assert_allclose(
            flowed, _reference_flow(x, mean, cov, ab[999], ab[300]), atol=1e-9
        )
        # E[x0 | x_t] = m + a C (a^2 C + s^2 I)^-1 (x_t - a m)
        a = np.sqrt(ab[300])
        var = ab[300] * cov + (1 - ab[300]) * np.eye(16)
        expected = mean + (a * cov @ np.linalg.solve(var, (x - a * mean).T)).T
        np.testing.assert_allclose(
            np.asarray(g.denoise(jnp.asarray(x), ab[300])), expected, atol=1e-9
        )
        # The flow composes and inverts.
        via = g.flow(g.flow(jnp.asarray(x), ab[999], ab[600]), ab[600], ab[300])
        np.testing.assert_allclose(np.asarray(via), flowed, atol=1e-9)
        back = g.flow(jnp.asarray(flowed), ab[300], ab[999])
        np.testing.assert_allclose(np.asarray(back), x, atol=1e-9)


def _gaussian_x0_model(g: DataGaussian, sch: schedules.Schedule):
    """The optimal x0 model of N(g) data: model_fn(x_t (B, H, W, C), t (B,))."""

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        return g.denoise(x_t, jnp.asarray(sch.alphas_cumprod, x_t.dtype)[t[0]])

    return model_fn


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver++", "heun", "ddpm"])
def test_gaussian_start_is_the_exact_flow_then_the_sampler_from_there(sampler: str) -> None:
    g, mean, cov = _exact_gaussian()
    sch = schedules.get_schedule("cosine", 1000)
    ab = sch.alphas_cumprod
    x_T = np.random.default_rng(3).normal(size=(4, 16))
    common = {"sampler": sampler, "num_steps": 8, "prediction": "x0", "clip_x0": False}
    model = _gaussian_x0_model(g, sch)
    started = samplers.sample(
        model,
        sch,
        (4, 4, 4, 1),
        jax.random.key(0),
        x_init=jnp.asarray(x_T.reshape(4, 4, 4, 1)),
        gaussian_start_t=700,
        data_gaussian=g,
        **common,
    )
    x_700 = _reference_flow(x_T, mean, cov, ab[999], ab[700]).reshape(4, 4, 4, 1)
    from_700 = samplers.sample(
        model,
        sch,
        (4, 4, 4, 1),
        jax.random.key(0),
        x_init=jnp.asarray(x_700, jnp.float32),
        start_timestep=700,
        **common,
    )
    np.testing.assert_allclose(started, from_700, atol=2e-5)


def test_gaussian_start_on_gaussian_data_is_exact_up_to_the_sampler_from_there() -> None:
    # With the optimal model, the only error left is the sampler's below t_s: heun with
    # 60 steps from t_s = 600 is within 2e-3 of the exact ODE solution from T - 1.
    g, mean, cov = _exact_gaussian()
    sch = schedules.get_schedule("cosine", 1000)
    ab = sch.alphas_cumprod
    x_T = np.random.default_rng(4).normal(size=(4, 16))
    out = samplers.sample(
        _gaussian_x0_model(g, sch),
        sch,
        (4, 4, 4, 1),
        jax.random.key(0),
        x_init=jnp.asarray(x_T.reshape(4, 4, 4, 1)),
        sampler="heun",
        num_steps=60,
        prediction="x0",
        clip_x0=False,
        gaussian_start_t=600,
        data_gaussian=g,
    )
    x_0 = _reference_flow(x_T, mean, cov, ab[999], ab[0])
    a0 = np.sqrt(ab[0])
    exact = (
        mean
        + (
            a0 * cov @ np.linalg.solve(ab[0] * cov + (1 - ab[0]) * np.eye(16), (x_0 - a0 * mean).T)
        ).T
    )
    assert np.max(np.abs(np.asarray(out).reshape(4, 16) - exact)) < 2e-3


def test_gaussian_start_saves_the_model_evaluations_above_it() -> None:
    g, _, _ = _exact_gaussian()
    sch = schedules.get_schedule("cosine", 1000)
    _, trajectory = samplers.sample(
        _gaussian_x0_model(g, sch),
        sch,
        (2, 4, 4, 1),
        jax.random.key(0),
        sampler="ddim",
        num_steps=5,
        prediction="x0",
        gaussian_start_t=800,
        data_gaussian=g,
        return_trajectory=True,
    )
    np.testing.assert_array_equal(trajectory.timesteps, [800, 600, 400, 200, 0])


@pytest.mark.parametrize("name", ["edm", "flow"])
@pytest.mark.parametrize("sampler", ["ddim", "unipc"])
def test_gaussian_start_sigma_on_a_continuous_formulation(name: str, sampler: str) -> None:
    # The exact flow from the grid's first level (edm: sigma_max; flow: t = 1, pure noise) to
    # gaussian_start_sigma, then the sampler's chain from there.
    g, mean, cov = _exact_gaussian()
    f = formulations.EDM() if name == "edm" else formulations.Flow()
    net = gaussian_oracle.net_of_denoiser(
        f, lambda x_vp, sigma: g.denoise(x_vp, 1.0 / (1.0 + sigma.reshape(-1)[0] ** 2))
    )
    spec = samplers.SamplerSpec.create(sampler=sampler, num_steps=6, clip_x0=False)
    top = samplers.prior_sigma(spec, f)
    assert top == (80.0 if name == "edm" else np.inf)
    x_top = np.random.default_rng(6).normal(size=(3, 16))  # x_vp at the top
    shape = (3, 4, 4, 1)
    started, traj = spec.replace(gaussian_start_sigma=2.0).sample(
        net,
        f,
        shape,
        jax.random.key(0),
        x_init=jnp.asarray((x_top * f.scale(top)).reshape(shape), jnp.float32),
        data_gaussian=g,
        return_trajectory=True,
    )
    assert float(traj.sigmas[0]) == pytest.approx(2.0, rel=1e-6)
    ab_top = 1.0 / (1.0 + top**2)
    x_2 = _reference_flow(x_top, mean, cov, ab_top, 1.0 / 5.0)
    from_2 = spec.sample(
        net,
        f,
        shape,
        jax.random.key(0),
        x_init=jnp.asarray((x_2 * f.scale(2.0)).reshape(shape), jnp.float32),
        start_sigma=2.0,
    )
    np.testing.assert_allclose(started, from_2, atol=2e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gaussian_start_t": 500}, r"needs data_gaussian"),
        ({"gaussian_start_t": 1000}, r"gaussian_start_t must be an integer in \[0, 999\]"),
        ({"gaussian_start_t": 5, "num_steps": 10}, r"num_steps=10 exceeds the 6 timesteps"),
        (
            {"gaussian_start_t": 500, "start_timestep": 400},
            r"a Gaussian start and a chain started part-way \(SDEdit\) both",
        ),
    ],
)
def test_bad_gaussian_start_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    g, _, _ = _exact_gaussian()
    sch = schedules.get_schedule("cosine", 1000)
    if "needs" not in message:
        kwargs["data_gaussian"] = g
    with pytest.raises(ValueError, match=message):
        samplers.sample(_gaussian_x0_model(g, sch), sch, (2, 4, 4, 1), jax.random.key(0), **kwargs)
