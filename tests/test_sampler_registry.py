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

from diffusion_jax import editing, formulations, samplers, schedules
from diffusion_jax.runner import evaluate
from diffusion_jax.samplers.base import option
from diffusion_jax.testing import gaussian_oracle

MU, S = 0.3, 0.5
SCH = schedules.get_schedule("linear", 1000)
SCH_100 = schedules.get_schedule("linear", 100)
FORMULATION = formulations.DDPM(SCH)
X_T = np.linspace(-3.0, 3.0, 64).reshape(2, 32)


def _euler_build(chain: samplers.Chain) -> samplers.Scan:
    """Euler on the probability-flow ODE in x~ = x_vp / alpha against sigma: one model
    evaluation per level, the last step to sigma = 0 returning the x0 prediction."""
    sigma = chain.sigmas
    sigma_next = np.append(sigma[1:], 0.0)
    alpha = 1.0 / np.sqrt(1.0 + sigma**2)

    def body(y: jax.Array, xs: tuple[Any, ...]) -> tuple[jax.Array, Any]:
        level, a, sig, sig_next = (xs[0], *map(chain.bcast, xs[1:]))
        x = a * y
        x0, _ = chain.denoise(x, level)
        y_next = y + (sig_next - sig) * (y - x0) / sig  # dy/dsigma = (y - x0) / sigma
        return y_next.astype(chain.dtype), (chain.denoise.own(x, level), x0)

    coefficients = (alpha, sigma, sigma_next)
    xs = (chain.levels(), *(jnp.asarray(c, chain.dtype) for c in coefficients))
    y_init = chain.x_init / chain.bcast(jnp.asarray(alpha[0]))
    return samplers.Scan(body, y_init, xs, lambda y: y, sigma)


def _toy_euler() -> samplers.Sampler:
    return samplers.Sampler(name="toy_euler", build=_euler_build, min_steps=2)


@pytest.fixture
def euler() -> Iterator[samplers.Sampler]:
    registered = samplers.register(_toy_euler())
    try:
        yield registered
    finally:
        samplers.unregister("toy_euler")


def _euler_error(num_steps: int) -> float:
    out = samplers.sample(
        gaussian_oracle.optimal_model(SCH, MU, S),
        SCH,
        X_T.shape,
        jax.random.key(0),
        sampler="toy_euler",
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
    assert samplers.get_sampler("toy_euler") is euler
    assert samplers.names()[-1] == "toy_euler" and "toy_euler" not in samplers.SAMPLERS
    errors = [_euler_error(n + 1) for n in (20, 40, 80, 160)]
    # First order: the error halves with each doubling of the steps, and is small at 161.
    slope = -np.polyfit(np.log([20, 40, 80, 160]), np.log(errors), 1)[0]
    assert abs(slope - 1.0) < 0.15, (errors, slope)
    assert errors[-1] < 0.03, errors
    # Euler in (x~, sigma) is deterministic DDIM, so the two agree to float32 rounding.
    args = (gaussian_oracle.optimal_model(SCH, MU, S), SCH, (4, 8), jax.random.key(3))
    toy, traj = samplers.sample(*args, sampler="toy_euler", num_steps=12, return_trajectory=True)
    ddim = samplers.sample(*args, sampler="ddim", num_steps=12)
    np.testing.assert_allclose(toy, ddim, atol=2e-5)
    assert traj.x_t.shape == (12, 4, 8) and float(jnp.max(jnp.abs(traj.x0_pred))) <= 1.0
    np.testing.assert_array_equal(traj.timesteps, samplers.get_timesteps(1000, 12))


def test_a_registered_sampler_goes_through_sampler_spec(euler: samplers.Sampler) -> None:
    spec = samplers.SamplerSpec(sampler="toy_euler", num_steps=101, clip_x0=False)
    spec.validate(FORMULATION)
    assert spec.name() == "toy_euler101_noclip"
    # Other samplers' options are dropped by `choose` (and refused by `replace`).
    assert spec.choose(eta=0.5, variance="fixed_large").name() == "toy_euler101_noclip"
    with pytest.raises(ValueError, match=r"unknown sampler options \['eta'\] for 'toy_euler'"):
        spec.replace(eta=0.5)
    out = spec.sample(
        gaussian_oracle.optimal_model(SCH, MU, S),
        FORMULATION,
        X_T.shape,
        jax.random.key(0),
        x_init=X_T,
    )
    exact = gaussian_oracle.exact_ode_solution(SCH, X_T, SCH.num_timesteps - 1, MU, S)
    assert np.max(np.abs(np.asarray(out) - exact)) < 0.05
    with pytest.raises(ValueError, match=r"num_steps must be an integer >= 2 .*'toy_euler'"):
        spec.replace(num_steps=1).validate(FORMULATION)


def test_an_unregistered_sampler_is_unknown_again() -> None:
    samplers.register(_toy_euler())
    samplers.unregister("toy_euler")
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
            "unipc",
        )
    )
    with pytest.raises(ValueError, match=r"unknown sampler 'toy_euler'; use one of \('ddpm', "):
        samplers.SamplerSpec(sampler="toy_euler")
    with pytest.raises(ValueError, match="no sampler 'toy_euler' is registered"):
        samplers.unregister("toy_euler")


def test_aliases_name_the_registered_samplers() -> None:
    assert samplers.canonical_name("euler") == "ddim"
    assert samplers.SamplerSpec(sampler="euler").sampler == "ddim"
    # The edm_* samplers of earlier releases are the shared samplers now.
    assert samplers.canonical_name("edm_heun") == "heun"
    assert samplers.canonical_name("edm_dpm_solver++2m_sde") == "dpm_solver++2m_sde"
    assert set(samplers.all_names()) >= {*samplers.SAMPLERS, "euler", "edm_euler"}


@dataclasses.dataclass(frozen=True)
class _NoisyOptions:
    """A sampler's own options: eta under another file-name label, with its own check."""

    eta: float = option(0.0, lambda eta: f"noise{eta:g}")

    def check(self) -> None:
        if self.eta > 1.0:
            raise ValueError(f"noisy_ddim needs eta <= 1; got {self.eta}")


def test_a_registered_sampler_names_and_checks_its_own_options() -> None:
    # DDIM's scan and grid check under another name, with its own label and check of eta.
    ddim = samplers.get_sampler("ddim")
    samplers.register(dataclasses.replace(ddim, name="noisy_ddim", options=_NoisyOptions))
    try:
        spec = samplers.SamplerSpec.create(sampler="noisy_ddim", num_steps=10, eta=0.5)
        spec.validate(FORMULATION)
        assert spec.name() == "noisy_ddim10_noise0.5"
        assert spec.replace(eta=0.0).name() == "noisy_ddim10"
        with pytest.raises(ValueError, match=r"noisy_ddim needs eta <= 1; got 1\.5"):
            spec.replace(eta=1.5).validate(FORMULATION)
        model, rng = gaussian_oracle.optimal_model(SCH, MU, S), jax.random.key(2)
        ddim_spec = spec.replace(sampler="ddim")  # keeps the eta the two share
        assert ddim_spec.options == samplers.ddim.DDIMOptions(eta=0.5)
        np.testing.assert_array_equal(
            spec.sample(model, FORMULATION, (3, 5), rng),
            ddim_spec.sample(model, FORMULATION, (3, 5), rng),
        )
        with pytest.raises(ValueError, match=r"takes _NoisyOptions; got DDIMOptions"):
            samplers.SamplerSpec(sampler="noisy_ddim", options=samplers.ddim.DDIMOptions())
    finally:
        samplers.unregister("noisy_ddim")


def test_registration_refuses_taken_names_and_bad_entries() -> None:
    with pytest.raises(ValueError, match="'ddim' is already registered"):
        samplers.register(samplers.get_sampler("ddim"))
    for alias in ("euler", "edm_heun"):  # an alias is taken too
        with pytest.raises(ValueError, match=f"'{alias}' is already registered"):
            samplers.register(samplers.Sampler(name=alias, build=_euler_build))
    with pytest.raises(ValueError, match=r"min_steps must be >= 1; got 0"):
        samplers.register(samplers.Sampler(name="toy", build=_euler_build, min_steps=0))
    with pytest.raises(ValueError, match=r"a sampler name must be a non-empty str"):
        samplers.register(samplers.Sampler(name="", build=_euler_build))
    assert "toy" not in samplers.names()


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
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
    assert (
        samplers.SamplerSpec(sampler=sampler, num_steps=6).num_evaluations
        == (traj.timesteps.shape[0])
    )


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
        ({"num_classes": 10}, "ddim50"),  # the model's
        ({"sampler": "unipc", "num_steps": 20}, "unipc20"),
        ({"sampler": "unipc", "num_steps": 20, "order": 3}, "unipc20_order3"),
        ({"sampler": "unipc", "lower_order_final": False}, "unipc50_nolof"),
        ({"sampler": "heun", "s_churn": 40.0, "s_noise": 1.003}, "heun50_churn40_snoise1.003"),
        (
            {"timestep_spacing": "karras", "sigma_max": 10.0, "rho": 5.0},
            "ddim50_karras_smax10_rho5",
        ),
        ({"gaussian_start_t": 800}, "ddim50_gs800"),
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
    # `choose` takes every sampler's options (a config holds them all) and keeps the chosen's.
    assert samplers.SamplerSpec().choose(**changes).name() == name


@pytest.mark.parametrize(
    ("sampler", "formulation", "name"),
    [
        # '' = the sampler's default grid for the formulation, named where not 'linspace'.
        ("ddim", formulations.DDPM(SCH), "ddim50"),
        ("heun", formulations.DDPM(SCH), "heun50_karras"),
        ("ddim", formulations.EDM(), "ddim50_karras"),
        ("ddim", formulations.Flow(), "ddim50"),
        ("heun", formulations.Flow(), "heun50_karras"),
    ],
)
def test_spec_name_resolves_the_default_grid_for_the_formulation(
    sampler: str, formulation: formulations.Formulation, name: str
) -> None:
    assert samplers.SamplerSpec(sampler=sampler).name(formulation) == name


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
        # heun's old grid ('linspace'); its own default on the ddpm formulation is 'karras',
        # which samples differently and is named so.
        ({"sampler": "heun", "num_steps": 9, "timestep_spacing": "linspace"}, "heun9_seed0_n1000"),
        ({"sampler": "heun", "num_steps": 9}, "heun9_karras_seed0_n1000"),
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


def test_spec_from_the_digits_config_has_the_old_choices() -> None:
    from configs import digits

    spec = samplers.SamplerSpec.from_config(digits.get_config())
    assert spec == samplers.SamplerSpec(
        sampler="dpm_solver++2m_sde",
        num_steps=20,
        timestep_spacing=spec.timestep_spacing,
        options=samplers.dpm_solver.DPMSolverOptions(lower_order_final=True),
    )
    assert spec.timestep_spacing in ("", "linspace")  # both 'linspace' on the ddpm formulation
    assert (spec.sigma_min, spec.sigma_max, spec.rho) == (0.002, 80.0, 7.0)
    assert (spec.clip_x0, spec.temperature, spec.guidance_scale) == (True, 1.0, 1.0)
    assert (spec.num_classes, spec.gaussian_start_t, spec.gaussian_start_sigma) == (None, 0, 0.0)
    cosine = formulations.DDPM(schedules.get_schedule("cosine", 1000))
    assert spec.name(cosine) == "dpm_solverpp2m_sde20"
    spec.validate(cosine)


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
