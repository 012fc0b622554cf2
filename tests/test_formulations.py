"""Formulations (ddpm, edm, flow) and every sampler on each of them, on exact Gaussian data.

Data x0 ~ N(MU, S^2) i.i.d. per pixel: the optimal network of any formulation and the
probability-flow solution between any two levels are closed form (`testing.gaussian_oracle`),
so a deterministic sampler's error against it is pure discretisation error and shrinks at the
sampler's order; a stochastic sampler's samples have the data's moments.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import formulations, samplers, schedules
from diffusion_jax.formulations import flow as flow_lib
from diffusion_jax.testing import gaussian_oracle

MU, S = 0.3, 0.5
COSINE = schedules.get_schedule("cosine", 1000)
COSINE_LEVELS = np.sqrt((1 - COSINE.alphas_cumprod) / COSINE.alphas_cumprod)
FORMULATIONS = {
    "ddpm": formulations.DDPM(COSINE),
    "edm": formulations.EDM(),
    "flow": formulations.Flow(),
}
# Starting points in x_vp covering +-3 standard deviations of N(0, I).
X_START = np.linspace(-3.0, 3.0, 64).reshape(4, 16)


def _moments_ok(x: Any, mean_bias: float, std_bias: float) -> tuple[float, float, bool]:
    """The sample mean and std of x against the data's: within 5 standard errors plus the
    sampler's own measured discretisation bias."""
    x = np.asarray(x, np.float64)
    n = x.size
    mean, std = float(x.mean()), float(x.std())
    ok = abs(mean - MU) < 5 * S / math.sqrt(n) + mean_bias
    ok = ok and abs(std - S) < 5 * S / math.sqrt(2 * n) + std_bias
    return mean, std, ok


# --------------------------------------------------------------------------- the interface


def _round_trip_levels(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, network times) at which each formulation is checked."""
    f = FORMULATIONS[name]
    if name == "ddpm":
        t = np.array([0, 1, 10, 250, 500, 900, 999])
        return COSINE_LEVELS[t], t
    sigmas = np.array([0.002, 0.1, 1.0, 5.0, 80.0] + ([np.inf] if name == "flow" else []))
    return sigmas, f.time(sigmas)


@pytest.mark.parametrize(
    ("name", "prediction"),
    [("ddpm", "eps"), ("ddpm", "x0"), ("ddpm", "v"), ("edm", None), ("flow", None)],
)
def test_denoised_of_the_target_gives_back_x0(name: str, prediction: str | None) -> None:
    f = FORMULATIONS[name]
    if prediction is not None:
        f = formulations.DDPM(COSINE, prediction=prediction)
    sigmas, times = _round_trip_levels(name)
    rng = np.random.default_rng(0)
    x0, noise = rng.uniform(-1, 1, (3, 4, 4, 1)), rng.normal(size=(3, 4, 4, 1))
    with jax.enable_x64(True):
        for sigma, time in zip(sigmas, times, strict=True):
            alpha, s = formulations.vp_alpha(sigma), formulations.vp_noise(sigma)
            x = jnp.asarray(f.scale(sigma) * (alpha * x0 + s * noise))
            sig = jnp.asarray(sigma, jnp.float64)
            target = f.target(x, sig, jnp.asarray(x0))
            assert np.all(np.isfinite(np.asarray(target))), (name, sigma)

            def net(x_in: jax.Array, t: jax.Array, out: jax.Array = target) -> jax.Array:
                return out

            denoised, var = f.denoised(net, x, sig, jnp.asarray(time))
            assert var is None
            np.testing.assert_allclose(denoised, x0, atol=1e-6, err_msg=f"{name} {sigma}")


def test_own_coordinates_are_each_formulations_path() -> None:
    # scale(sigma) * x_vp with x_vp = alpha x0 + s n is each formulation's own x:
    # ddpm sqrt(ab) x0 + sqrt(1 - ab) n, edm x0 + sigma n, flow (1 - t) x0 + t n.
    x0, n = 0.4, -1.3
    ddpm, edm, flow = (FORMULATIONS[k] for k in ("ddpm", "edm", "flow"))
    levels = COSINE_LEVELS
    np.testing.assert_allclose(np.asarray(ddpm.levels), levels, rtol=1e-12)
    for step in (0, 300, 999):
        sigma, ab = levels[step], COSINE.alphas_cumprod[step]
        x_vp = formulations.vp_alpha(sigma) * x0 + formulations.vp_noise(sigma) * n
        assert ddpm.scale(sigma) * x_vp == pytest.approx(np.sqrt(ab) * x0 + np.sqrt(1 - ab) * n)
        assert ddpm.time(sigma) == step
    for sigma in (0.002, 0.7, 80.0):
        x_vp = formulations.vp_alpha(sigma) * x0 + formulations.vp_noise(sigma) * n
        assert edm.scale(sigma) * x_vp == pytest.approx(x0 + sigma * n)
        back = float(edm.sigma_of_time(jnp.asarray(edm.time(sigma))))
        assert back == pytest.approx(sigma, rel=1e-5)
    for t in (0.001, 0.25, 0.5, 0.9, 1.0):
        sigma = np.inf if t == 1.0 else t / (1 - t)
        x_vp = formulations.vp_alpha(sigma) * x0 + formulations.vp_noise(sigma) * n
        assert flow.scale(sigma) * x_vp == pytest.approx((1 - t) * x0 + t * n)
        assert flow.time(sigma) == pytest.approx(1000.0 * t)
        back_flow = float(flow.sigma_of_time(jnp.asarray(flow.time(sigma))))
        assert back_flow == pytest.approx(sigma, rel=1e-4)


# --------------------------------------------------------------------------- flow training


def test_flow_loss_is_the_velocity_mse_at_the_given_t_and_noise() -> None:
    rng = np.random.default_rng(1)
    x0, noise = rng.uniform(-1, 1, (5, 3, 3, 2)), rng.normal(size=(5, 3, 3, 2))
    t = np.array([0.0, 0.1, 0.5, 0.9, 1.0])
    seen = []

    def model_fn(x_t: jax.Array, time: jax.Array) -> jax.Array:
        seen.append((x_t, time))
        return jnp.sin(x_t) + 1e-3 * time[:, None, None, None]

    with jax.enable_x64(True):
        loss = formulations.Flow().training_loss(
            model_fn, jnp.asarray(x0), jax.random.key(0), t=jnp.asarray(t), noise=jnp.asarray(noise)
        )
    tb = t[:, None, None, None]
    x_t = (1 - tb) * x0 + tb * noise
    v = np.sin(x_t) + 1e-3 * 1000 * tb
    np.testing.assert_allclose(seen[0][0], x_t, rtol=1e-12)
    np.testing.assert_allclose(seen[0][1], 1000 * t, rtol=1e-12)
    np.testing.assert_allclose(loss, np.mean((v - (noise - x0)) ** 2, axis=(1, 2, 3)), rtol=1e-10)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_flow_loss_of_the_optimal_velocity_is_its_closed_form_minimum(t: float) -> None:
    # v = n - x0, x_t = (1 - t) x0 + t n: Var(v | x_t) = Var(x0 | x_t) / t^2
    # = S^2 / ((1 - t)^2 S^2 + t^2) per pixel, the least loss any network attains at t.
    f = formulations.Flow()
    net = gaussian_oracle.optimal_net(f, MU, S)
    # 262144 pixels: relative standard error of the mean squared error 0.3%.
    x0 = MU + S * jax.random.normal(jax.random.key(3), (16384, 16))
    ts = jnp.full((16384,), t)
    loss = float(jnp.mean(f.training_loss(net, x0, jax.random.key(4), t=ts)))
    expected = S**2 / ((1 - t) ** 2 * S**2 + t**2)
    assert loss == pytest.approx(expected, rel=0.02)
    # Off the optimum by 0.1 everywhere costs 0.1^2 more (the same t and noise).
    worse = f.training_loss(lambda x, time: net(x, time) + 0.1, x0, jax.random.key(4), t=ts)
    assert float(jnp.mean(worse)) - loss == pytest.approx(0.01, abs=0.002)


@pytest.mark.parametrize(("logit_mean", "logit_std", "shift"), [(0.0, 1.0, 1.0), (0.3, 0.8, 3.0)])
def test_flow_logit_normal_times_with_shift_have_the_shifted_distribution(
    logit_mean: float, logit_std: float, shift: float
) -> None:
    # The shift multiplies sigma = t / (1 - t): logit(t') = logit(t) + log(shift), so logit(t')
    # ~ N(logit_mean + log(shift), logit_std^2); with logit_mean 0 the median is shift/(1+shift).
    f = formulations.Flow(logit_mean=logit_mean, logit_std=logit_std, shift=shift)
    t = np.asarray(f.sample_t(jax.random.key(0), 200_000), np.float64)
    assert np.all((t > 0) & (t < 1))
    logit = np.log(t / (1 - t))
    assert logit.mean() == pytest.approx(logit_mean + math.log(shift), abs=0.01)
    assert logit.std() == pytest.approx(logit_std, rel=0.01)
    if logit_mean == 0.0:
        assert np.median(t) == pytest.approx(shift / (1 + shift), abs=0.005)
    assert formulations.Flow(logit_mean=0.0, shift=shift).fraction_sigma(0.5, 80.0) == (
        pytest.approx(shift)
    )


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_uniform_times_cover_zero_to_one(shift: float) -> None:
    f = formulations.Flow(time_sampling="uniform", shift=shift)
    t = np.asarray(f.sample_t(jax.random.key(1), 200_000), np.float64)
    assert np.all((t >= 0) & (t < 1)) and t.min() < 1e-3 and t.max() > 1 - 1e-3
    u = t / (shift - (shift - 1) * t)  # the unshifted uniform time
    np.testing.assert_allclose(np.quantile(u, [0.1, 0.5, 0.9]), [0.1, 0.5, 0.9], atol=0.005)
    with pytest.raises(ValueError, match=r"unknown time_sampling 'normal'"):
        formulations.Flow(time_sampling="normal")
    with pytest.raises(ValueError, match=r"shift must be a finite number > 0"):
        formulations.Flow(shift=0.0)
    assert set(flow_lib.TIME_SAMPLINGS) == {"uniform", "logit_normal"}


# --------------------------------------------------------------------------- ODE convergence

# sampler: (options, N and 2N grid levels on 'karras', its order). Measured slopes
# log2(error(N) / error(2N)), float32, on ddpm (cosine) / edm / flow: ddim 0.98 / 0.98 / 0.98,
# heun 2.15 / 2.16 / 2.16, pure 2M 2.18 / 2.24 / 2.24, pure 3M (40 -> 80) 3.11 / 3.15 / 3.15,
# unipc (order 2 + its corrector: third order) 3.15 / 3.18 / 3.18.
ORDERS = {
    "ddim": ({}, 20, 1.0),
    "heun": ({}, 20, 2.0),
    "dpm_solver++": ({"lower_order_final": False}, 20, 2.0),
    "dpm_solver++3m": ({"lower_order_final": False}, 40, 3.0),
    "unipc": ({}, 20, 3.0),
}


@pytest.mark.parametrize("sampler", list(ORDERS))
@pytest.mark.parametrize("name", list(FORMULATIONS))
def test_deterministic_samplers_converge_at_their_order_on_every_formulation(
    name: str, sampler: str
) -> None:
    options, n, order = ORDERS[sampler]
    spec = samplers.SamplerSpec.create(sampler=sampler, timestep_spacing="karras", **options)
    f = FORMULATIONS[name]
    errors = [
        gaussian_oracle.spec_ode_error(spec.replace(num_steps=k), f, X_START, MU, S)
        for k in (n, 2 * n)
    ]
    slope = math.log2(errors[0] / errors[1])
    assert order - 0.3 < slope < order + 0.45, (errors, slope)


def test_unipc_is_third_order_and_its_corrector_raises_each_order_by_one() -> None:
    # UniPC-p (predictor of order p, corrector one higher) converges at order p + 1.
    f = FORMULATIONS["edm"]
    for order, n, expected in ((1, 20, 2.0), (3, 40, 4.0)):
        spec = samplers.SamplerSpec.create(
            sampler="unipc", order=order, timestep_spacing="karras", lower_order_final=False
        )
        errors = [
            gaussian_oracle.spec_ode_error(spec.replace(num_steps=k), f, X_START, MU, S)
            for k in (n, 2 * n)
        ]
        slope = math.log2(errors[0] / errors[1])
        assert expected - 0.3 < slope < expected + 0.5, (order, errors, slope)


def _reference_unipc(
    denoise: Any, sigmas: np.ndarray, x: np.ndarray, order: int, lower_order_final: bool
) -> np.ndarray:
    """UniPC-bh2 in data prediction, transcribed from the algorithm of Zhao et al. 2023
    (Algorithm 3 and the multistep loop of their reference code), in float64 numpy:
    denoise(x, k) is D at level k; ends with D at the last level (denoise_to_zero)."""
    alpha, s = formulations.vp_alpha(sigmas), formulations.vp_noise(sigmas)
    lam = -np.log(sigmas)
    steps = len(sigmas) - 1

    def update(x: Any, ms: list, ks: list, k: int, p: int, corrector: bool) -> tuple[Any, Any]:
        k0, m0 = ks[-1], ms[-1]
        h = lam[k] - lam[k0]
        rks, d1s = [], []
        for i in range(1, p):
            rk = (lam[ks[-(i + 1)]] - lam[k0]) / h
            rks.append(rk)
            d1s.append((ms[-(i + 1)] - m0) / rk)
        rks.append(1.0)
        hh = -h
        h_phi_1 = math.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1.0
        b_h = math.expm1(hh)
        rows, b, fact = [], [], 1
        for i in range(1, p + 1):
            rows.append([rk ** (i - 1) for rk in rks])
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / fact
        r, bv = np.array(rows), np.array(b)
        base = s[k] / s[k0] * x - alpha[k] * h_phi_1 * m0
        pred_res = 0.0
        if d1s:
            rhos_p = np.array([0.5]) if p == 2 else np.linalg.solve(r[:-1, :-1], bv[:-1])
            pred_res = sum(c * d for c, d in zip(rhos_p, d1s, strict=True))
        x_t = base - alpha[k] * b_h * pred_res
        if not corrector:
            return x_t, None
        rhos_c = np.array([0.5]) if p == 1 else np.linalg.solve(r, bv)
        m_t = denoise(x_t, k)
        corr_res = sum(c * d for c, d in zip(rhos_c[:-1], d1s, strict=True)) if d1s else 0.0
        return base - alpha[k] * b_h * (corr_res + rhos_c[-1] * (m_t - m0)), m_t

    ms, ks = [denoise(x, 0)], [0]
    for step in range(1, order):
        x, m = update(x, ms, ks, step, step, True)
        ms, ks = [*ms, m], [*ks, step]
    for step in range(order, steps + 1):
        p = min(order, steps + 1 - step) if lower_order_final else order
        x, m = update(x, ms, ks, step, p, step < steps)
        ms, ks = ms[1:] + [m], ks[1:] + [step]
    return denoise(x, steps)


@pytest.mark.parametrize(("order", "lower_order_final"), [(2, True), (2, False), (3, True)])
def test_unipc_matches_a_transcription_of_the_reference_algorithm(
    order: int, lower_order_final: bool
) -> None:
    # Any denoiser will do (a nonlinear one here): a ddpm model predicting x0 outputs D itself.
    f = formulations.DDPM(COSINE, prediction="x0")
    levels = COSINE_LEVELS
    d_of = lambda x, sigma, xp: 0.8 * xp.tanh(1.3 * x) + 0.1 * xp.log(sigma) * x
    spec = samplers.SamplerSpec.create(
        sampler="unipc",
        num_steps=9,
        timestep_spacing="karras",
        order=order,
        lower_order_final=lower_order_final,
        clip_x0=False,
    )
    sigmas = spec.grid(f)
    x = np.random.default_rng(5).normal(size=(2, 6))
    with jax.enable_x64(True):
        out = spec.sample(
            lambda x_t, t: d_of(x_t, jnp.asarray(levels)[t][:, None], jnp),
            f,
            x.shape,
            jax.random.key(0),
            x_init=jnp.asarray(x),
        )
    ref = _reference_unipc(lambda x, k: d_of(x, sigmas[k], np), sigmas, x, order, lower_order_final)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpm_solver++2m_sde", "unipc"])
def test_edm_and_flow_are_one_process_so_their_samples_agree(sampler: str) -> None:
    # On the same grid, from the same x_vp and noise, every sampler draws the same x0 whatever
    # the formulation's coordinates and network parametrisation.
    spec = samplers.SamplerSpec.create(
        sampler=sampler, num_steps=8, timestep_spacing="karras", clip_x0=False
    )
    x_vp = jax.random.normal(jax.random.key(2), (3, 8))
    outs = []
    for name in ("edm", "flow"):
        f = FORMULATIONS[name]
        x_init = x_vp * float(f.scale(spec.grid(f)[0]))
        net = gaussian_oracle.optimal_net(f, MU, S)
        outs.append(spec.sample(net, f, (3, 8), jax.random.key(7), x_init=x_init))
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-5)


# --------------------------------------------------------------------------- moments

# (sampler, options, grid levels, std bias budget): first-order ancestral samplers keep an
# O(1/N) bias in the std on 'karras' (measured with 262144 pixels at N = 200: ddim eta 1 and
# ddpm -0.015, ddim eta 0.5 -0.009, fixed_large +0.006; 2M SDE +0.001 at 200, +0.009 at 50).
MOMENT_CASES = [
    ("ddim", {"eta": 1.0}, 200, 0.02),
    ("ddim", {"eta": 0.5}, 200, 0.012),
    ("ddpm", {}, 200, 0.02),
    ("ddpm", {"variance": "fixed_large"}, 200, 0.01),
    ("dpm_solver++2m_sde", {}, 50, 0.012),
]


@pytest.mark.parametrize(
    ("sampler", "options", "num_steps", "std_bias"),
    MOMENT_CASES,
    ids=lambda v: "-".join(f"{k}{w}" for k, w in v.items()) if isinstance(v, dict) else None,
)
@pytest.mark.parametrize("name", list(FORMULATIONS))
def test_stochastic_samplers_draw_the_data_moments_on_every_formulation(
    name: str, sampler: str, options: dict[str, Any], num_steps: int, std_bias: float
) -> None:
    f = FORMULATIONS[name]
    spec = samplers.SamplerSpec.create(
        sampler=sampler, num_steps=num_steps, timestep_spacing="karras", clip_x0=False, **options
    )
    x = spec.sample(gaussian_oracle.optimal_net(f, MU, S), f, (64, 64), jax.random.key(1))
    mean, std, ok = _moments_ok(x, 0.003, std_bias)
    assert ok, (mean, std)


# --------------------------------------------------------------------------- flow from t = 1

# (sampler, N, std bias budget, ODE error bound): flow's default 'linspace' grid starts at pure
# noise (sigma = inf). Measured (262144 pixels): std bias ddim(50) -0.012, ddpm(100) -0.018,
# dpm_solver++(20) 0.000, unipc(20) -0.001; ODE errors ddim 0.043, dpm_solver++ 6e-4, unipc
# 3e-3.
FLOW_T1_CASES = [
    ("ddim", 50, 0.015, 0.06),
    ("ddpm", 100, 0.02, None),
    ("dpm_solver++", 20, 0.004, 0.003),
    ("unipc", 20, 0.004, 0.01),
]


@pytest.mark.parametrize(("sampler", "num_steps", "std_bias", "ode_bound"), FLOW_T1_CASES)
def test_flow_samples_from_pure_noise_at_t_one(
    sampler: str, num_steps: int, std_bias: float, ode_bound: float | None
) -> None:
    f = FORMULATIONS["flow"]
    spec = samplers.SamplerSpec.create(sampler=sampler, num_steps=num_steps, clip_x0=False)
    sigmas = spec.grid(f)
    assert np.isinf(sigmas[0]) and sigmas[-1] == pytest.approx(1 / (num_steps - 1))
    x, traj = spec.sample(
        gaussian_oracle.optimal_net(f, MU, S),
        f,
        (64, 64),
        jax.random.key(3),
        return_trajectory=True,
    )
    assert np.all(np.isfinite(np.asarray(x))) and np.all(np.isfinite(np.asarray(traj.x0_pred)))
    assert float(traj.timesteps[0]) == 1000.0
    mean, std, ok = _moments_ok(x, 0.003, std_bias)
    assert ok, (mean, std)
    if ode_bound is not None:
        error = gaussian_oracle.spec_ode_error(spec, f, X_START, MU, S)
        assert error < ode_bound, error


def test_heun_from_t_one_is_refused_in_one_line_naming_karras() -> None:
    f = FORMULATIONS["flow"]
    spec = samplers.SamplerSpec.create(sampler="heun", num_steps=10, timestep_spacing="linspace")
    with pytest.raises(ValueError, match=r"timestep_spacing='karras'") as info:
        spec.validate(f)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"timestep_spacing='karras'"):
        samplers.sample(
            gaussian_oracle.optimal_net(f, MU, S),
            f,
            (2, 4),
            jax.random.key(0),
            sampler="heun",
            timestep_spacing="linspace",
        )
    # heun's own default grid on flow is 'karras', which starts at sigma_max.
    assert samplers.SamplerSpec(sampler="heun").grid(f)[0] == pytest.approx(80.0)
