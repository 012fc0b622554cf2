"""Samplers on the exact Gaussian case, where the optimal model and the PF-ODE are closed form.

Data x0 ~ N(MU, S^2) i.i.d. per pixel. Then x_t ~ N(a mu, a^2 s^2 + sigma^2) with a = sqrt(ab_t),
sigma = sqrt(1 - ab_t), and the optimal predictors are
    eps*(x_t, t) = sigma (x_t - a mu) / (a^2 s^2 + sigma^2),
    x0*(x_t, t)  = mu + a s^2 (x_t - a mu) / (a^2 s^2 + sigma^2),   v* = a eps* - sigma x0*.
The probability-flow ODE maps x at t_start to t = 0 affinely:
    x_0 - a_0 mu = sqrt(a_0^2 s^2 + sigma_0^2) / sqrt(a_T^2 s^2 + sigma_T^2) * (x_T - a_T mu),
and the deterministic samplers return x0*(x_0, 0), so their error against that is pure
discretisation error. float32 suffices: the smallest error measured below (~1e-4) is far above
float32 rounding (~1e-6), so the order test runs without x64 (one test checks x64 separately).
These are the ddpm formulation's tests, through a schedule and `samplers.sample`;
tests/test_formulations.py runs every sampler on every formulation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, formulations, samplers, schedules
from diffusion_jax.testing import gaussian_oracle

MU, S = 0.3, 0.5
SCH = schedules.get_schedule("linear", 1000)


def gaussian_model(
    sch: schedules.Schedule, prediction: str = "eps", mu: float = MU, s: float = S
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The optimal model_fn(x_t, t) for data N(mu, s^2), outputting `prediction`."""
    return gaussian_oracle.optimal_model(sch, mu, s, prediction)


def exact_ode_sample(
    sch: schedules.Schedule, x_start: np.ndarray, t_start: int, mu: float = MU, s: float = S
) -> np.ndarray:
    """float64: the PF-ODE solution from x_start at t_start to t = 0, then x0*(., 0)."""
    return gaussian_oracle.exact_ode_solution(sch, x_start, t_start, mu, s)


# Fixed starting points x_T covering +-3 standard deviations of N(0, I).
X_T = np.linspace(-3.0, 3.0, 64).reshape(2, 32)


def _ode_error(sampler: str, num_steps: int, sch: schedules.Schedule = SCH, **kwargs: Any) -> float:
    """Max abs error of a deterministic sampler vs the exact ODE solution from the same x_T."""
    return gaussian_oracle.ode_error(sampler, num_steps, sch, X_T, MU, S, **kwargs)


# --------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("spacing", samplers.TIMESTEP_SPACINGS)
@pytest.mark.parametrize(
    ("num_timesteps", "num_steps"),
    [
        (1000, 2),
        (1000, 10),
        (1000, 50),
        (1000, 999),
        (1000, 1000),
        (10, 3),
        (10, 9),
        (7, 7),
        (2, 2),
        (1, 1),
    ],
)
def test_timesteps_are_strictly_decreasing_unique_and_end_at_zero_but_leading_and_trailing(
    spacing: str, num_timesteps: int, num_steps: int
) -> None:
    ab = schedules.get_schedule("cosine", num_timesteps).alphas_cumprod
    ts = samplers.get_timesteps(num_timesteps, num_steps, spacing, alphas_cumprod=ab)
    assert ts.shape == (num_steps,)
    assert np.all(np.diff(ts) < 0)
    assert ts[0] <= num_timesteps - 1
    if spacing == "trailing":
        assert ts[-1] == round(num_timesteps / num_steps) - 1
    elif spacing != "leading" and num_steps > 1:
        assert ts[-1] == 0
    if spacing in ("linspace", "trailing", "quadratic"):
        assert ts[0] == num_timesteps - 1


def test_timestep_spacings_follow_their_formulas() -> None:
    lin = samplers.get_timesteps(1000, 50, "linspace")
    np.testing.assert_array_equal(lin, np.round(np.linspace(999, 0, 50)).astype(int))
    np.testing.assert_array_equal(
        samplers.get_timesteps(1000, 10, "leading"), np.arange(9, -1, -1) * 100
    )
    np.testing.assert_array_equal(
        samplers.get_timesteps(1000, 10, "trailing"),  # Lin et al. 2024, table 2
        [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
    )
    quad = samplers.get_timesteps(1000, 10, "quadratic")
    np.testing.assert_array_equal(quad, np.round(999 * np.linspace(1, 0, 10) ** 2).astype(int))
    np.testing.assert_array_equal(samplers.get_timesteps(1000, 1000), np.arange(999, -1, -1))
    for spacing in ("linspace", "leading", "trailing", "quadratic"):  # one jump from x_T to x0
        np.testing.assert_array_equal(samplers.get_timesteps(1000, 1, spacing), [999])


# --------------------------------------------------------------------------- distributions

# 64 x 256 = 16384 i.i.d. pixels: standard errors 0.004 (mean) and 0.003 (std). Each config's
# own bias, measured with 262144 pixels, is below 0.004 (DDPM with T steps: std -0.003; DDIM
# 500 steps: -0.003; DPM-Solver++ 200 steps: +0.002; Heun 50: +0.001). Tolerance: 5 standard
# errors plus that bias.
MOMENT_CONFIGS = [
    {"sampler": "ddpm", "num_steps": 1000},
    {"sampler": "ddpm", "num_steps": 1000, "variance": "fixed_large"},
    {"sampler": "ddim", "num_steps": 500},
    {"sampler": "ddim", "num_steps": 1000, "eta": 1.0},
    {"sampler": "dpm_solver++", "num_steps": 200},
    {"sampler": "heun", "num_steps": 50},
]


@pytest.mark.parametrize("config", MOMENT_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_samples_have_the_data_mean_and_std(config: dict[str, Any]) -> None:
    x = samplers.sample(
        gaussian_model(SCH), SCH, (64, 256), jax.random.key(1), clip_x0=False, **config
    )
    assert x.shape == (64, 256) and x.dtype == jnp.float32
    x = np.asarray(x, np.float64)
    assert abs(x.mean() - MU) < 5 * 0.0039 + 0.004
    assert abs(x.std() - S) < 5 * 0.0028 + 0.004


# --------------------------------------------------------------------------- convergence order

ORDER_CASES = {
    # sampler: (numbers of ODE steps N - 1, expected order). Pure 2M DPM-Solver++'s last steps
    # span a large log-SNR range on uniform-in-t timesteps, so it reaches its order later.
    "ddim": ((10, 20, 40, 80, 160), 1.0),
    "heun": ((10, 20, 40, 80), 2.0),
    "dpm_solver++": ((40, 80, 160, 320), 2.0),
}
# heun's default grid is 'karras'; these orders were measured on 'linspace' (as ddim's).
ORDER_OPTIONS: dict[str, dict[str, Any]] = {
    "heun": {"timestep_spacing": "linspace"},
    # Pure 2M: lower_order_final makes the step onto t = 0 first order (tested below).
    "dpm_solver++": {"lower_order_final": False},
}


@pytest.mark.parametrize("sampler", list(ORDER_CASES))
def test_deterministic_sampler_error_shrinks_at_its_order(sampler: str) -> None:
    intervals, order = ORDER_CASES[sampler]
    kwargs = ORDER_OPTIONS.get(sampler, {})
    errors = np.array([_ode_error(sampler, n + 1, **kwargs) for n in intervals])
    slope = -np.polyfit(np.log(intervals), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.15, (errors, slope)
    assert np.all(np.diff(errors) < 0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_lower_order_final_beats_2m_and_ddim_with_few_steps(schedule: str) -> None:
    # Measured max errors (linear / cosine): lower_order_final N=11 0.27 / 0.069, N=21 0.059 /
    # 0.0025; pure 2M 0.57 / 0.39, 0.34 / 0.14; ddim 0.38 / 0.21, 0.20 / 0.11.
    sch = schedules.get_schedule(schedule, 1000)
    final1 = {n: _ode_error("dpm_solver++", n, sch) for n in (6, 11, 21)}
    for n in (11, 21):
        pure_2m = _ode_error("dpm_solver++", n, sch, lower_order_final=False)
        ddim = _ode_error("ddim", n, sch)
        assert final1[n] < 0.8 * min(pure_2m, ddim), (n, final1[n], pure_2m, ddim)
    # Still convergent: the error shrinks with N, by > 2x per doubling of the steps here.
    assert final1[11] < 0.5 * final1[6], final1
    assert final1[21] < 0.5 * final1[11], final1


def test_dpm_solver_with_lower_order_final_and_three_steps_is_ddim() -> None:
    # Both updates are first order (the first has no history, the second is onto t = 0).
    args = (gaussian_model(SCH), SCH, (4, 16), jax.random.key(5))
    ddim = samplers.sample(*args, sampler="ddim", num_steps=3, clip_x0=False)
    dpm = samplers.sample(*args, sampler="dpm_solver++", num_steps=3, clip_x0=False)
    np.testing.assert_allclose(dpm, ddim, rtol=1e-5, atol=1e-5)
    pure_2m = samplers.sample(
        *args, sampler="dpm_solver++", num_steps=3, clip_x0=False, lower_order_final=False
    )
    assert float(jnp.max(jnp.abs(pure_2m - ddim))) > 0.05


def test_ode_error_under_x64_matches_float32() -> None:
    err32 = _ode_error("heun", 41, timestep_spacing="linspace")
    with jax.enable_x64(True):
        err64 = _ode_error("heun", 41, timestep_spacing="linspace")
        out = samplers.sample(gaussian_model(SCH), SCH, (2, 3), jax.random.key(0), num_steps=3)
        assert out.dtype == jnp.float64
    assert jnp.zeros(1).dtype == jnp.float32  # x64 did not leak
    # The error is discretisation error, not float32 rounding.
    assert err64 == pytest.approx(err32, rel=1e-3)


# --------------------------------------------------------------------------- equivalences


def _fold_in_noise(rng: jax.Array, shape: tuple[int, ...], index: int) -> jax.Array:
    """The sampler's noise for sample ids arange(B) at `index` (0 = x_T, k + 1 = step k)."""
    keys = [jax.random.fold_in(jax.random.fold_in(rng, i), index) for i in range(shape[0])]
    return jnp.stack([jax.random.normal(k, shape[1:]) for k in keys])


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_with_all_steps_equals_ho_ancestral_loop(variance: str) -> None:
    sch = schedules.get_schedule("linear", 20)
    model = gaussian_model(sch, mu=0.2, s=1.5)  # x0 predictions leave [-1, 1]: clipping matters
    shape, rng = (3, 5), jax.random.key(7)
    out = samplers.sample(
        model, sch, shape, rng, sampler="ddpm", num_steps=20, variance=variance, clip_x0=True
    )
    x = _fold_in_noise(rng, shape, 0)
    for k, t in enumerate(range(19, -1, -1)):
        tt = jnp.full((3,), t, jnp.int32)
        mean, _, log_var, _ = diffusion.p_mean_variance(
            sch, model(x, tt), x, tt, variance=variance, clip_x0=True
        )
        x = mean + (t > 0) * jnp.exp(0.5 * log_var) * _fold_in_noise(rng, shape, k + 1)
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip_x0", [False, True])
def test_ddim_with_eta_one_equals_ddpm_on_the_same_timesteps(clip_x0: bool) -> None:
    model = gaussian_model(SCH, mu=0.2, s=1.5)
    kwargs: dict[str, Any] = {"num_steps": 25, "clip_x0": clip_x0, "timestep_spacing": "quadratic"}
    ddpm = samplers.sample(model, SCH, (4, 32), jax.random.key(3), sampler="ddpm", **kwargs)
    ddim = samplers.sample(
        model, SCH, (4, 32), jax.random.key(3), sampler="ddim", eta=1.0, **kwargs
    )
    np.testing.assert_allclose(ddim, ddpm, rtol=1e-4, atol=1e-4)


def test_dpm_solver_first_step_is_ddim() -> None:
    # With 2 timesteps DPM-Solver++ takes one first-order step, then denoises: exactly DDIM.
    model = gaussian_model(SCH)
    args = (model, SCH, (4, 16), jax.random.key(5))
    dpm = samplers.sample(*args, sampler="dpm_solver++", num_steps=2, clip_x0=False)
    ddim = samplers.sample(*args, sampler="ddim", num_steps=2, clip_x0=False)
    np.testing.assert_allclose(dpm, ddim, rtol=1e-5, atol=1e-5)


# The conversion is shared; ddim uses both x0 and eps, heun only x0 (in EDM's y-space).
@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_eps_x0_and_v_models_give_the_same_samples(sampler: str) -> None:
    outs = [
        samplers.sample(
            gaussian_model(SCH, prediction),
            SCH,
            (4, 16),
            jax.random.key(6),
            sampler=sampler,
            num_steps=20,
            prediction=prediction,
            eta=0.5,
            clip_x0=False,
        )
        for prediction in diffusion.PREDICTIONS
    ]
    # float32 conversions near t = T-1 (1/sqrt(ab) ~ 157) limit the agreement to ~1e-4.
    np.testing.assert_allclose(outs[1], outs[0], atol=5e-4)
    np.testing.assert_allclose(outs[2], outs[0], atol=5e-4)


@pytest.mark.parametrize(
    "config", [{"sampler": "ddpm"}, {"sampler": "ddim", "eta": 0.7}], ids=["ddpm", "ddim"]
)
def test_temperature_scales_only_the_injected_noise(config: dict[str, Any]) -> None:
    # For the Gaussian model each sampler is affine in (x_T, injected noise), so scaling that
    # noise by the temperature makes the output affine in the temperature.
    run = jax.jit(
        lambda temp: samplers.sample(
            gaussian_model(SCH),
            SCH,
            (4, 16),
            jax.random.key(8),
            num_steps=30,
            temperature=temp,
            clip_x0=False,
            **config,
        )
    )
    x0, x_half, x1 = run(0.0), run(0.5), run(1.0)
    np.testing.assert_allclose(x_half, 0.5 * (x0 + x1), atol=1e-5)
    assert float(jnp.max(jnp.abs(x1 - x0))) > 0.05


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver++", "heun"])
def test_deterministic_samplers_ignore_temperature(sampler: str) -> None:
    run = lambda temp: samplers.sample(
        gaussian_model(SCH),
        SCH,
        (2, 8),
        jax.random.key(8),
        sampler=sampler,
        num_steps=5,
        temperature=temp,
    )
    np.testing.assert_array_equal(run(0.3), run(1.0))


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_clip_x0_keeps_samples_in_range(sampler: str) -> None:
    # Data N(0.5, 2^2): most unclipped x0 predictions lie outside [-1, 1].
    clipped, traj = samplers.sample(
        gaussian_model(SCH, mu=0.5, s=2.0),
        SCH,
        (8, 32),
        jax.random.key(2),
        sampler=sampler,
        num_steps=10,
        clip_x0=True,
        return_trajectory=True,
    )
    assert float(jnp.max(jnp.abs(clipped))) <= 1.0
    assert float(jnp.max(jnp.abs(traj.x0_pred))) <= 1.0


# --------------------------------------------------------------------------- determinism, jit


# ddim (eta > 0) draws its step noise like ddpm, dpm_solver++ its x_T like heun.
@pytest.mark.parametrize("sampler", ["ddpm", "heun"])
def test_samples_are_reproducible_and_independent_of_the_batch(sampler: str) -> None:
    model = gaussian_model(SCH)

    @jax.jit
    def run(rng: jax.Array, ids: jax.Array) -> jax.Array:
        return samplers.sample(
            model,
            SCH,
            (ids.shape[0], 4, 4, 1),
            rng,
            sampler=sampler,
            num_steps=6,
            eta=1.0,
            sample_ids=ids,
        )

    rng = jax.random.key(11)
    big = run(rng, jnp.arange(16, dtype=jnp.int32))
    np.testing.assert_array_equal(big, run(rng, jnp.arange(16, dtype=jnp.int32)))
    first = run(rng, jnp.arange(4, dtype=jnp.int32))
    np.testing.assert_allclose(first, big[:4], rtol=1e-6, atol=1e-6)
    ids = jnp.array([9, 3, 15, 8], jnp.int32)
    np.testing.assert_allclose(run(rng, ids), big[np.asarray(ids)], rtol=1e-6, atol=1e-6)
    # The default sample_ids are arange(B).
    default = samplers.sample(model, SCH, (4, 4, 4, 1), rng, sampler=sampler, num_steps=6, eta=1.0)
    np.testing.assert_allclose(default, first, rtol=1e-6, atol=1e-6)
    assert not np.allclose(run(jax.random.key(12), jnp.arange(4, dtype=jnp.int32)), first)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_sample_jits_as_one_scan_with_one_model_copy(sampler: str) -> None:
    traces = []
    base = gaussian_model(SCH)

    def model(x: jax.Array, t: jax.Array) -> jax.Array:
        traces.append(t.shape)
        return base(x, t)

    fn = lambda rng: samplers.sample(model, SCH, (2, 3), rng, sampler=sampler, num_steps=7)
    jaxpr = jax.make_jaxpr(fn)(jax.random.key(0))
    assert len(traces) == 1  # the model is traced once: it sits in the scan body only
    top_level = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert top_level.count("scan") == 1
    assert jax.jit(fn)(jax.random.key(4)).shape == (2, 3)


def test_a_traced_schedule_is_refused_with_a_clear_error() -> None:
    # The formulation's levels, the grid and every coefficient are float64 numpy, computed
    # before tracing: a schedule passed to a jitted function as an argument has no values.
    def fn(sch: schedules.Schedule, rng: jax.Array) -> jax.Array:
        return samplers.sample(
            gaussian_model(sch), sch, (4, 8), rng, sampler="dpm_solver++", num_steps=10
        )

    with pytest.raises(ValueError, match=r"needs a concrete schedule.*close over the schedule"):
        jax.jit(fn)(SCH, jax.random.key(0))
    closed = jax.jit(lambda rng: fn(SCH, rng))(jax.random.key(0))
    np.testing.assert_allclose(closed, fn(SCH, jax.random.key(0)), atol=1e-5)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_trajectory_records_every_model_evaluation(sampler: str) -> None:
    out, traj = samplers.sample(
        gaussian_model(SCH),
        SCH,
        (2, 3),
        jax.random.key(0),
        sampler=sampler,
        num_steps=5,
        timestep_spacing="linspace",
        return_trajectory=True,
        clip_x0=False,
    )
    ts = samplers.get_timesteps(1000, 5)
    expected = ts if sampler != "heun" else np.array([999, 749, 749, 500, 500, 250, 250, 0, 0])
    np.testing.assert_array_equal(traj.timesteps, expected)
    sigmas = np.sqrt((1 - SCH.alphas_cumprod) / SCH.alphas_cumprod)[expected]
    np.testing.assert_allclose(traj.sigmas, sigmas, rtol=1e-6)
    assert traj.x_t.shape == traj.x0_pred.shape == (len(expected), 2, 3)
    # Every sampler ends with the x0 prediction at t = 0.
    np.testing.assert_allclose(out, traj.x0_pred[-1], atol=1e-6)
    np.testing.assert_allclose(traj.x_t[0], _fold_in_noise(jax.random.key(0), (2, 3), 0))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_one_step_returns_the_x0_prediction_at_t_max(sampler: str) -> None:
    model = gaussian_model(SCH, "x0")
    x_T = jax.random.normal(jax.random.key(1), (3, 4))
    out = samplers.sample(
        model,
        SCH,
        (3, 4),
        jax.random.key(0),
        sampler=sampler,
        num_steps=1,
        prediction="x0",
        x_init=x_T,
        clip_x0=False,
    )
    np.testing.assert_allclose(out, model(x_T, jnp.full((3,), 999)), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- guidance


def _class_gaussian_model(sch: schedules.Schedule, means: jax.Array):
    """Optimal eps model for data N(means[label], S^2); means has num_classes + 1 entries."""

    def model_fn(x_t: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        ab = diffusion.extract(sch.alphas_cumprod, t, x_t.ndim)
        a, sigma = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
        mu = means[labels].reshape((-1,) + (1,) * (x_t.ndim - 1))
        return sigma * (x_t - a * mu) / (a * a * S * S + sigma * sigma)

    return model_fn


def test_guided_sampling_uses_the_null_label_and_the_guidance_formula() -> None:
    means = jnp.array([-0.5, 0.5, 0.0])  # 2 classes + null (index 2)
    model = _class_gaussian_model(SCH, means)
    labels = jnp.array([0, 1, 1, 0])
    kw: dict[str, Any] = {"sampler": "ddim", "num_steps": 20, "clip_x0": False}
    args = (SCH, (4, 256), jax.random.key(0))
    cond = samplers.sample(model, *args, labels=labels, **kw)
    np.testing.assert_allclose(cond.mean(axis=1), means[labels], atol=0.15)
    scale1 = samplers.sample(model, *args, labels=labels, guidance_scale=1.0, num_classes=2, **kw)
    np.testing.assert_array_equal(scale1, cond)
    uncond = samplers.sample(lambda x, t: model(x, t, jnp.full((4,), 2)), *args, **kw)
    scale0 = samplers.sample(model, *args, labels=labels, guidance_scale=0.0, num_classes=2, **kw)
    np.testing.assert_allclose(scale0, uncond, atol=1e-6)
    manual = lambda x, t: (
        model(x, t, jnp.full((4,), 2))
        + 3.0 * (model(x, t, labels) - model(x, t, jnp.full((4,), 2)))
    )
    scale3 = samplers.sample(model, *args, labels=labels, guidance_scale=3.0, num_classes=2, **kw)
    np.testing.assert_allclose(scale3, samplers.sample(manual, *args, **kw), atol=1e-5)


# --------------------------------------------------------------------------- bad input


def _never_called(*args: Any) -> jax.Array:
    raise AssertionError("model_fn must not be called for invalid options")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "eulr"}, r"unknown sampler 'eulr'; use one of \('ddpm', 'ddim', "),
        ({"prediction": "score"}, r"unknown prediction 'score'; use one of \('eps', 'x0', 'v'\)"),
        ({"timestep_spacing": "uniform"}, r"unknown timestep_spacing 'uniform'.*'linspace'"),
        (
            {"sampler": "ddpm", "variance": "learned"},
            r"unknown variance 'learned'.*'fixed_small', 'fixed_large'",
        ),
        ({"num_steps": 1001}, r"num_steps must be an integer in \[1, 1000\].*got 1001"),
        ({"num_steps": 0}, r"num_steps must be an integer >= 1 .*got 0"),
        ({"num_steps": 10.0}, r"num_steps must be an integer"),
        ({"eta": -0.1}, r"eta must be a number >= 0"),
        ({"eta": 50.0}, r"eta=50.0 makes the DDIM noise exceed .*use eta <= "),
        ({"sampler": "dpm_solver++", "num_steps": 1}, r"num_steps .*>= 2 .*'dpm_solver\+\+'"),
        ({"sampler": "unipc", "num_steps": 1}, r"num_steps .*>= 2 .*'unipc'"),
        ({"temperature": -1.0}, r"temperature must be >= 0"),
        ({"guidance_scale": 2.0}, r"guidance_scale != 1 needs labels"),
        (
            {"guidance_scale": 2.0, "labels": jnp.zeros(4, jnp.int32)},
            r"guidance_scale != 1 needs num_classes",
        ),
        ({"labels": jnp.zeros(3, jnp.int32)}, r"labels must have shape \(4,\)"),
        ({"sample_ids": jnp.arange(5)}, r"sample_ids must have shape \(4,\)"),
        (
            {"sampler": "dpm_solver++", "lower_order_final": "yes"},
            r"lower_order_final must be a bool; got 'yes'",
        ),
    ],
)
def test_bad_sampler_options_raise_before_tracing_the_model(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        samplers.sample(_never_called, SCH, (4, 2), jax.random.key(0), **kwargs)


def test_bad_shape_and_model_output_are_reported() -> None:
    with pytest.raises(ValueError, match=r"shape must be a tuple of positive ints"):
        samplers.sample(_never_called, SCH, (0, 3), jax.random.key(0))
    with pytest.raises(ValueError, match=r"model_fn returned shape \(4, 3\); expected \(4, 2\)"):
        samplers.sample(lambda x, t: jnp.zeros((4, 3)), SCH, (4, 2), jax.random.key(0))


def test_spec_validate_is_usable_without_a_model() -> None:
    samplers.SamplerSpec(sampler="heun", num_steps=18).validate(formulations.DDPM(SCH))
    short = formulations.DDPM(schedules.get_schedule("linear", 50))
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 50\]"):
        samplers.SamplerSpec(sampler="ddim", num_steps=100).validate(short)
