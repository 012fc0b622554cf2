"""The sampler registry: a sampler registered from outside the package runs through `sample`,
`SamplerSpec.validate` and `SamplerSpec.name` with no other edit; file names of every option;
specs from configs; RePaint's reuse of the ddpm step."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import editing, samplers, schedules
from diffusion_jax.runner import evaluate
from diffusion_jax.testing import gaussian_oracle

MU, S = 0.3, 0.5
SCH = schedules.get_schedule("linear", 1000)
SCH_100 = schedules.get_schedule("linear", 100)
X_T = np.linspace(-3.0, 3.0, 64).reshape(2, 32)


def _euler_build(chain: samplers.Chain) -> samplers.Scan:
    """Euler on the probability-flow ODE in y = x / a against sigma = sigma_t / a_t: one model
    evaluation per timestep, the last step to sigma = 0 returning the x0 prediction."""
    ab = np.asarray(chain.alphas_cumprod, np.float64)
    sigma = np.sqrt((1.0 - ab) / ab)
    sigma_next = np.append(sigma[1:], 0.0)

    def body(y: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, Any]:
        t_step, a, sig, sig_next = (xs[0], *map(chain.bcast, xs[1:]))
        x = a * y
        x0, _ = chain.denoise(x, t_step)
        y_next = y + (sig_next - sig) * (y - x0) / sig  # dy/dsigma = (y - x0) / sigma
        return y_next.astype(chain.dtype), (x, x0)

    coefficients = (np.sqrt(ab), sigma, sigma_next)
    xs = (chain.ts, *(jnp.asarray(c, chain.dtype) for c in coefficients))
    y_init = chain.x_init / chain.bcast(jnp.asarray(np.sqrt(ab[0])))
    return samplers.Scan(body, y_init, xs, lambda y: y, chain.ts)


@pytest.fixture
def euler() -> Iterator[samplers.Sampler]:
    registered = samplers.register(
        samplers.Sampler(name="euler", build=_euler_build, ode=True, min_steps=2)
    )
    try:
        yield registered
    finally:
        samplers.unregister("euler")


def _euler_error(num_steps: int) -> float:
    out = samplers.sample(
        gaussian_oracle.optimal_model(SCH, MU, S),
        SCH,
        X_T.shape,
        jax.random.key(0),
        sampler="euler",
        num_steps=num_steps,
        clip_x0=False,
        x_init=jnp.asarray(X_T),
    )
    exact = gaussian_oracle.exact_ode_solution(SCH, X_T, SCH.num_timesteps - 1, MU, S)
    return float(np.max(np.abs(np.asarray(out, np.float64) - exact)))


# --------------------------------------------------------------------------- a new sampler


def test_a_registered_sampler_runs_and_converges_to_the_exact_ode_solution(
    euler: samplers.Sampler,
) -> None:
    assert samplers.get_sampler("euler") is euler
    assert samplers.names()[-1] == "euler" and "euler" not in samplers.SAMPLERS
    errors = [_euler_error(n + 1) for n in (20, 40, 80, 160)]
    # First order: the error halves with each doubling of the steps, and is small at 161.
    slope = -np.polyfit(np.log([20, 40, 80, 160]), np.log(errors), 1)[0]
    assert abs(slope - 1.0) < 0.15, (errors, slope)
    assert errors[-1] < 0.03, errors
    # Euler in (y, sigma) is deterministic DDIM, so the two agree to float32 rounding.
    args = (gaussian_oracle.optimal_model(SCH, MU, S), SCH, (4, 8), jax.random.key(3))
    toy, traj = samplers.sample(*args, sampler="euler", num_steps=12, return_trajectory=True)
    ddim = samplers.sample(*args, sampler="ddim", num_steps=12)
    np.testing.assert_allclose(toy, ddim, atol=2e-5)
    assert traj.x_t.shape == (12, 4, 8) and float(jnp.max(jnp.abs(traj.x0_pred))) <= 1.0


def test_a_registered_sampler_goes_through_sampler_spec(euler: samplers.Sampler) -> None:
    spec = samplers.SamplerSpec(sampler="euler", num_steps=101, clip_x0=False)
    spec.validate(SCH)
    assert spec.name() == "euler101_noclip"
    assert spec.replace(eta=0.5, variance="fixed_large").name() == "euler101_noclip"
    out = spec.sample(
        gaussian_oracle.optimal_model(SCH, MU, S), SCH, X_T.shape, jax.random.key(0), x_init=X_T
    )
    exact = gaussian_oracle.exact_ode_solution(SCH, X_T, SCH.num_timesteps - 1, MU, S)
    assert np.max(np.abs(np.asarray(out) - exact)) < 0.05
    with pytest.raises(ValueError, match=r"'euler' integrates the ODE .* needs num_steps >= 2"):
        spec.replace(num_steps=1).validate(SCH)


def test_an_unregistered_sampler_is_unknown_again() -> None:
    samplers.register(samplers.Sampler(name="euler", build=_euler_build, ode=True, min_steps=2))
    samplers.unregister("euler")
    assert (
        samplers.names()
        == samplers.SAMPLERS
        == (
            "ddpm",
            "ddim",
            "dpm_solver++",
            "dpm_solver++3m",
            "dpm_solver++2m_sde",
            "heun",
            "edm_euler",
            "edm_heun",
            "edm_stochastic",
            "edm_dpm_solver++",
            "edm_dpm_solver++2m_sde",
        )
    )
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; use one of \('ddpm', "):
        samplers.SamplerSpec(sampler="euler").validate(SCH)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        samplers.unregister("euler")


def test_a_registered_sampler_names_and_checks_its_own_options() -> None:
    def at_most_one(eta: Any, options: samplers.SamplerOptions) -> None:
        if eta > 1.0:
            raise ValueError(f"noisy_ddim needs eta <= 1; got {eta}")

    noise_level = samplers.Option("eta", 0.0, label=lambda eta: f"noise{eta:g}", check=at_most_one)
    # DDIM's scan and schedule check under another name, with its own label and check of eta.
    ddim = samplers.get_sampler("ddim")
    samplers.register(dataclasses.replace(ddim, name="noisy_ddim", options=(noise_level,)))
    try:
        spec = samplers.SamplerSpec(sampler="noisy_ddim", num_steps=10, eta=0.5)
        spec.validate(SCH)
        assert spec.name() == "noisy_ddim10_noise0.5"
        assert spec.replace(eta=0.0).name() == "noisy_ddim10"
        with pytest.raises(ValueError, match=r"noisy_ddim needs eta <= 1; got 1\.5"):
            spec.replace(eta=1.5).validate(SCH)
        model, rng = gaussian_oracle.optimal_model(SCH, MU, S), jax.random.key(2)
        np.testing.assert_array_equal(
            spec.sample(model, SCH, (3, 5), rng),
            spec.replace(sampler="ddim").sample(model, SCH, (3, 5), rng),
        )
    finally:
        samplers.unregister("noisy_ddim")


def test_registration_refuses_taken_names_and_unknown_options() -> None:
    with pytest.raises(ValueError, match="'ddim' is already registered"):
        samplers.register(samplers.get_sampler("ddim"))
    churn = samplers.Option("s_tmin", 0.0, label=str)
    with pytest.raises(ValueError, match=r"reads unknown options \['s_tmin'\]"):
        samplers.register(samplers.Sampler(name="edm", build=_euler_build, options=(churn,)))
    assert "edm" not in samplers.names()


@pytest.mark.parametrize("sampler", samplers.DDPM_SAMPLERS)
def test_num_evaluations_is_the_trajectory_length(sampler: str) -> None:
    _, traj = samplers.sample(
        gaussian_oracle.optimal_model(SCH, MU, S),
        SCH,
        (2, 3),
        jax.random.key(0),
        sampler=sampler,
        num_steps=6,
        return_trajectory=True,
    )
    assert traj.timesteps.shape == (samplers.get_sampler(sampler).num_evaluations(6),)


# --------------------------------------------------------------------------- SamplerSpec.name


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({}, "ddim50"),
        ({"eta": 0.5}, "ddim50_eta0.5"),
        ({"sampler": "ddpm", "eta": 0.5}, "ddpm50"),  # eta is ddim's
        ({"sampler": "ddpm", "variance": "fixed_large"}, "ddpm50_fixed_large"),
        ({"sampler": "ddpm", "variance": "learned_range"}, "ddpm50_learned_range"),
        ({"variance": "fixed_large"}, "ddim50"),  # variance is ddpm's
        ({"sampler": "dpm_solver++", "num_steps": 20}, "dpm_solverpp20"),
        (
            {"sampler": "dpm_solver++", "num_steps": 20, "lower_order_final": False},
            "dpm_solverpp20_pure2m",
        ),
        ({"lower_order_final": False}, "ddim50"),
        ({"sampler": "heun", "num_steps": 18}, "heun18"),
        ({"timestep_spacing": "quadratic"}, "ddim50_quadratic"),
        ({"guidance_scale": 2.0}, "ddim50_g2"),
        ({"temperature": 0.8}, "ddim50_temp0.8"),
        ({"clip_x0": False}, "ddim50_noclip"),
        ({"prediction": "v", "learn_sigma": True, "num_classes": 10}, "ddim50"),  # the model's
        (
            {
                "eta": 0.25,
                "timestep_spacing": "trailing",
                "guidance_scale": 1.5,
                "temperature": 0.9,
                "clip_x0": False,
            },
            "ddim50_eta0.25_trailing_g1.5_temp0.9_noclip",
        ),
    ],
)
def test_spec_name_shows_every_option_that_changes_the_samples(
    changes: dict[str, Any], name: str
) -> None:
    assert samplers.SamplerSpec(**changes).name() == name


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        # The names the eval mode gave before the registry: existing eval shards keep resuming.
        ({}, "dpm_solverpp2m_sde20_seed0_n1000"),
        (
            {"sampler": "ddim", "eta": 0.5, "timestep_spacing": "leading"},
            "ddim20_eta0.5_leading_seed0_n1000",
        ),
        (
            {"sampler": "ddpm", "variance": "fixed_large", "temperature": 0.7, "clip_x0": False},
            "ddpm20_fixed_large_temp0.7_noclip_seed0_n1000",
        ),
        ({"sampler": "dpm_solver++", "guidance_scale": 3.0}, "dpm_solverpp20_g3_seed0_n1000"),
        ({"sampler": "heun", "num_steps": 9}, "heun9_seed0_n1000"),
        (
            {
                "sampler": "ddim",
                "eta": 0.3,
                "guidance_scale": 2.0,
                "label": 3,
                "temperature": 0.5,
                "clip_x0": False,
                "timestep_spacing": "trailing",
            },
            "ddim20_eta0.3_trailing_g2_label3_temp0.5_noclip_seed0_n1000",
        ),
    ],
)
def test_eval_names_built_from_the_spec_are_unchanged(
    sampling: dict[str, Any], expected: str
) -> None:
    from configs import digits

    config = digits.get_config()
    config.model.class_conditional, config.diffusion.label_dropout = True, 0.1
    config.sampling.update(sampling)
    assert evaluate.eval_name(config) == expected


def test_spec_from_the_digits_config_has_the_old_kwargs() -> None:
    from configs import digits

    spec = samplers.SamplerSpec.from_config(digits.get_config())
    assert spec.kwargs() == {
        "sampler": "dpm_solver++2m_sde",
        "num_steps": 20,
        "eta": 0.0,
        "prediction": "eps",
        "clip_x0": True,
        "temperature": 1.0,
        "timestep_spacing": "linspace",
        "variance": "fixed_small",
        "guidance_scale": 1.0,
        "num_classes": None,
        "learn_sigma": False,
        "lower_order_final": True,
        "sigma_max": 80.0,
        "rho": 7.0,
        "gaussian_start_t": 0,
        "sigma_min": 0.002,
        "s_churn": 0.0,
        "s_min": 0.0,
        "s_max": float("inf"),
        "s_noise": 1.0,
    }
    assert spec.name() == "dpm_solverpp2m_sde20"
    spec.validate(schedules.get_schedule("cosine", 1000))


# --------------------------------------------------------------------------- RePaint


def _two_channel(x: jax.Array, t: jax.Array) -> jax.Array:
    """A learn_sigma model: the Gaussian oracle's eps, then variance values in (-1, 1)."""
    eps = gaussian_oracle.optimal_model(SCH_100, MU, S)(x, t)
    return jnp.concatenate([eps, jnp.tanh(x + 0.3)], axis=-1)


@pytest.mark.parametrize(
    "options",
    [
        {"variance": "fixed_small", "clip_x0": True},
        {"variance": "fixed_large", "clip_x0": False, "timestep_spacing": "quadratic"},
        {"variance": "learned_range", "learn_sigma": True},
    ],
    ids=["fixed_small", "fixed_large", "learned_range"],
)
def test_repaint_without_known_pixels_or_resampling_is_the_ddpm_sampler(
    options: dict[str, Any],
) -> None:
    # With no known pixel and one pass (no jumps) each RePaint move is the ddpm sampler's
    # reverse step; the two number their injected noise differently, so compare them without it
    # (temperature 0; x_T is fold_in(key_i, 0) in both).
    learn_sigma = options.get("learn_sigma", False)
    model = _two_channel if learn_sigma else gaussian_oracle.optimal_model(SCH_100, MU, S)
    shape, rng = (3, 4, 4, 1), jax.random.key(9)
    x0 = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, shape), jnp.float32)
    unknown = np.zeros(shape, bool)
    for num_steps, temperature in ((7, 0.0), (1, 1.0)):  # one step injects no noise
        kwargs = {"num_steps": num_steps, "temperature": temperature, **options}
        repaint = editing.inpaint(model, SCH_100, x0, unknown, rng, resample_steps=1, **kwargs)
        ddpm = samplers.sample(model, SCH_100, shape, rng, sampler="ddpm", **kwargs)
        np.testing.assert_array_equal(repaint, ddpm)
