"""The EDM formulation (diffusion_jax.formulations.edm; diffusion_jax.edm is its deprecated
location): preconditioning against Karras et al. 2022's Table 1, optimality on exact Gaussian
data, convergence of the shared samplers on it against the closed-form probability-flow
solution (the edm_* sampler names of earlier releases are deprecated aliases of them), and a
tiny run through the runner."""

from __future__ import annotations

import copy
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import edm, samplers
from diffusion_jax.data_gaussian import DataGaussian
from diffusion_jax.errors import ConfigError
from diffusion_jax.runner import sample as sample_mode
from diffusion_jax.runner import train as train_mode
from diffusion_jax.runner import validation
from diffusion_jax.runner.workdir import read_metrics

PROCESS = edm.EDM()
SIGMAS = np.array([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 80.0])


def _gaussian(dim: int = 4, seed: int = 0) -> DataGaussian:
    """N(mean, V diag(eigvals) V^T): std about sigma_data, one direction nearly flat."""
    rng = np.random.default_rng(seed)
    eigvecs, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eigvals = np.linspace(0.01, 0.3, dim)
    return DataGaussian(mean=rng.uniform(-0.3, 0.3, dim), eigvals=eigvals, eigvecs=eigvecs)


def _ideal_denoiser(g: DataGaussian, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """E[x0 | x0 + sigma n = x] (B, D) for x0 ~ g, sigma scalar or (B,)."""
    s2 = jnp.reshape(jnp.asarray(sigma, x.dtype) ** 2, (-1, 1))
    gain = g.eigvals / (g.eigvals + s2)  # (B or 1, D)
    z = (x - g.mean) @ g.eigvecs * gain
    return (z @ g.eigvecs.T + g.mean).astype(x.dtype)


def _optimal_net(g: DataGaussian, process: edm.EDM = PROCESS):
    """The network F whose preconditioned D is the ideal denoiser: F = (D* - c_skip x) / c_out,
    with sigma read back from the time input NOISE_INPUT_SCALE * ln(sigma) / 4."""

    def net(x_in: jax.Array, time: jax.Array) -> jax.Array:
        sigma = jnp.exp(4.0 * time / edm.NOISE_INPUT_SCALE)[:, None].astype(x_in.dtype)
        x = x_in / process.c_in(sigma)
        return (_ideal_denoiser(g, x, sigma[:, 0]) - process.c_skip(sigma) * x) / process.c_out(
            sigma
        )

    return net


# --------------------------------------------------------------------------- preconditioning


def test_coefficients_and_loss_weight_are_table_1_of_karras_et_al():
    s, sd = SIGMAS, 0.5
    np.testing.assert_allclose(PROCESS.c_skip(s), sd**2 / (s**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(PROCESS.c_out(s), s * sd / np.sqrt(s**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(PROCESS.c_in(s), 1 / np.sqrt(s**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(PROCESS.c_noise(s), np.log(s) / 4, rtol=1e-12)
    np.testing.assert_allclose(PROCESS.loss_weight(s), (s**2 + sd**2) / (s * sd) ** 2, rtol=1e-12)
    # The paper's derivation: the network input and its effective target have unit variance
    # for data of std sigma_data, and lambda = 1 / c_out^2 weights every sigma equally.
    c_skip, c_out, c_in = PROCESS.c_skip(s), PROCESS.c_out(s), PROCESS.c_in(s)
    np.testing.assert_allclose(c_in**2 * (sd**2 + s**2), 1.0, rtol=1e-12)
    np.testing.assert_allclose(((1 - c_skip) ** 2 * sd**2 + c_skip**2 * s**2) / c_out**2, 1.0)
    np.testing.assert_allclose(PROCESS.loss_weight(s) * c_out**2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(c_skip + c_out**2 / sd**2, 1.0, rtol=1e-12)
    # Another sigma_data changes them as the formulas say.
    other = edm.EDM(sigma_data=1.0)
    np.testing.assert_allclose(other.c_skip(1.0), 0.5)
    np.testing.assert_allclose(other.c_out(1.0), 1 / np.sqrt(2))


def test_the_denoiser_is_the_identity_as_sigma_goes_to_zero():
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))

    def net(x_in, time):  # anything bounded
        return jnp.tanh(x_in) + time[:, None, None, None] / 1000.0

    for sigma, tol in ((1e-4, 5e-4), (1e-6, 5e-6)):
        np.testing.assert_allclose(PROCESS.denoise(net, x, sigma), x, atol=tol)
    far = PROCESS.denoise(net, x, 100.0)
    assert float(jnp.max(jnp.abs(far - x))) > 1.0


def test_the_time_input_is_the_scaled_c_noise():
    time = PROCESS.net_time(jnp.asarray([0.002, 1.0, 80.0]), 3)
    np.testing.assert_allclose(time, edm.NOISE_INPUT_SCALE * np.log([0.002, 1.0, 80.0]) / 4)


def test_karras_sigmas_are_eq_5():
    s = edm.karras_sigmas(18, 0.002, 80.0, 7.0)
    i = np.arange(18)
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s, expected, rtol=1e-12)
    assert s[0] == pytest.approx(80.0) and s[-1] == pytest.approx(0.002)
    with pytest.raises(ValueError, match=r"sigma_min=1\.0 must be below sigma_max=0\.5"):
        edm.karras_sigmas(5, 1.0, 0.5, 7.0)


# --------------------------------------------------------------------------- Gaussian data


@pytest.mark.parametrize("sigma", [0.05, 0.5, 5.0])
def test_the_optimal_network_attains_the_closed_form_loss_and_perturbations_lose(sigma):
    g = _gaussian(dim=6)
    n = 20000
    key = jax.random.key(1)
    z = jax.random.normal(key, (n, 6))
    x0 = g.mean + (z * np.sqrt(g.eigvals)) @ g.eigvecs.T
    sig = jnp.full((n,), sigma, jnp.float32)
    rng = jax.random.key(2)
    net = _optimal_net(g)
    loss = float(jnp.mean(PROCESS.training_loss(net, x0.astype(jnp.float32), rng, sigma=sig)))
    # E|D* - x0|^2 = tr(sigma^2 Sigma (Sigma + sigma^2)^-1); the loss averages over the D values.
    mmse = float(np.sum(sigma**2 * g.eigvals / (g.eigvals + sigma**2))) / 6
    expected = float(PROCESS.loss_weight(sigma)) * mmse
    assert loss == pytest.approx(expected, rel=0.03), (loss, expected)
    # The same noise with F moved off the optimum in any direction costs more.
    for k in range(3):
        direction = jax.random.normal(jax.random.key(10 + k), (6,))
        worse = lambda x_in, t, d=direction: net(x_in, t) + 0.05 * d
        other = float(
            jnp.mean(PROCESS.training_loss(worse, x0.astype(jnp.float32), rng, sigma=sig))
        )
        assert other > loss


def _edm_ode_error(sampler: str, num_steps: int, **kwargs) -> float:
    """Max abs error (float64) of an edm sampler with the optimal network on Gaussian data,
    against the exact PF-ODE solution from sigma_max to sigma_min followed by D*(., sigma_min)
    (where every edm sampler ends)."""
    g = _gaussian()
    x_t = 80.0 * np.random.default_rng(3).normal(size=(8, 4))
    with jax.enable_x64(True):
        out = samplers.sample(
            _optimal_net(g),
            PROCESS,
            x_t.shape,
            jax.random.key(0),
            sampler=sampler,
            num_steps=num_steps,
            timestep_spacing="karras",
            clip_x0=False,
            x_init=jnp.asarray(x_t),
            **kwargs,
        )
        out = np.asarray(out, np.float64)
    s_max, s_min = 80.0, 0.002
    z = (x_t - g.mean) @ g.eigvecs
    z = z * np.sqrt((g.eigvals + s_min**2) / (g.eigvals + s_max**2))
    x_min = z @ g.eigvecs.T + g.mean
    exact = np.asarray(_ideal_denoiser(g, jnp.asarray(x_min), s_min))
    return float(np.max(np.abs(out - exact)))


def _observed_order(sampler: str, steps: tuple[int, ...], **kwargs) -> tuple[float, list[float]]:
    errors = [_edm_ode_error(sampler, n, **kwargs) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return float(slope), errors


def test_heun_converges_at_second_order_to_the_exact_ode_solution():
    order, errors = _observed_order("heun", (16, 32, 64))
    assert 1.8 < order < 2.3, (order, errors)
    assert errors[-1] < 0.01, errors


def test_ddim_converges_at_first_order():
    order, errors = _observed_order("ddim", (32, 64, 128))
    assert 0.85 < order < 1.2, (order, errors)


def test_dpm_solver_converges_and_beats_euler_at_equal_evaluations():
    order, errors = _observed_order("dpm_solver++", (16, 32, 64))
    assert order > 1.5 and errors[-1] < 0.01, (order, errors)
    assert _edm_ode_error("dpm_solver++", 32) < _edm_ode_error("ddim", 32) / 4


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("edm_euler", "ddim"),
        ("edm_heun", "heun"),
        ("edm_stochastic", "heun"),
        ("edm_dpm_solver++", "dpm_solver++"),
        ("edm_dpm_solver++2m_sde", "dpm_solver++2m_sde"),
    ],
)
def test_the_edm_sampler_names_are_deprecated_aliases_of_the_shared_samplers(old, new):
    assert samplers.canonical_name(old) == new
    assert samplers.SamplerSpec(sampler=old) == samplers.SamplerSpec(sampler=new)
    assert old not in samplers.SAMPLERS and old in samplers.all_names()
    g = _gaussian()
    args = (_optimal_net(g), PROCESS, (3, 4), jax.random.key(5))
    kw = {"num_steps": 6, "timestep_spacing": "karras", "clip_x0": False}
    np.testing.assert_array_equal(
        samplers.sample(*args, sampler=old, **kw), samplers.sample(*args, sampler=new, **kw)
    )


def test_the_stochastic_sampler_without_churn_is_heun_and_with_churn_differs():
    g = _gaussian()
    args = (_optimal_net(g), PROCESS, (5, 4), jax.random.key(7))
    kw = {"num_steps": 8, "timestep_spacing": "karras", "clip_x0": False}
    heun = samplers.sample(*args, sampler="edm_heun", **kw)
    no_churn = samplers.sample(*args, sampler="edm_stochastic", **kw)
    np.testing.assert_array_equal(heun, no_churn)
    churned = samplers.sample(*args, sampler="edm_stochastic", s_churn=10.0, s_max=50.0, **kw)
    assert float(jnp.max(jnp.abs(churned - heun))) > 1e-3
    again = samplers.sample(*args, sampler="edm_stochastic", s_churn=10.0, s_max=50.0, **kw)
    np.testing.assert_array_equal(churned, again)


@pytest.mark.parametrize(
    ("sampler", "options"),
    [
        ("edm_stochastic", {"num_steps": 96, "s_churn": 80.0, "s_min": 0.05, "s_max": 10.0}),
        ("edm_dpm_solver++2m_sde", {"num_steps": 80}),
    ],
)
def test_stochastic_samplers_keep_the_gaussian_data_distribution(sampler, options):
    """With injected noise the samplers still draw from the data's Gaussian: mean and
    covariance of many samples match it (Monte Carlo tolerance; edm_stochastic at 24 steps and
    s_churn=20 is still 0.05 off, at 96 steps below the sampling noise)."""
    g = _gaussian()
    out = samplers.sample(
        _optimal_net(g),
        PROCESS,
        (4000, 4),
        jax.random.key(11),
        sampler=sampler,
        timestep_spacing="karras",
        clip_x0=False,
        **options,
    )
    out = np.asarray(out, np.float64)
    np.testing.assert_allclose(out.mean(0), g.mean, atol=0.03)
    cov = g.eigvecs @ np.diag(g.eigvals) @ g.eigvecs.T
    np.testing.assert_allclose(np.cov(out.T), cov, atol=0.03)


def test_edm_trajectory_records_every_evaluation_at_its_sigma():
    g = _gaussian()
    out, traj = samplers.sample(
        _optimal_net(g),
        PROCESS,
        (2, 4),
        jax.random.key(0),
        sampler="edm_heun",
        num_steps=4,
        timestep_spacing="karras",
        return_trajectory=True,
    )
    sig = edm.karras_sigmas(4, 0.002, 80.0, 7.0)
    visited = np.array([sig[0], sig[1], sig[1], sig[2], sig[2], sig[3], sig[3]])
    np.testing.assert_allclose(traj.sigmas, visited, rtol=1e-6)
    # The network's time input there: NOISE_INPUT_SCALE * c_noise(sigma).
    np.testing.assert_allclose(
        traj.timesteps, edm.NOISE_INPUT_SCALE * np.log(visited) / 4, rtol=1e-5
    )
    assert traj.x_t.shape == (7, 2, 4)
    # x_t is what the network's preconditioning saw: x in EDM's own coordinates, x0 + sigma n.
    assert float(jnp.std(traj.x_t[0])) > 20.0
    np.testing.assert_array_equal(out, traj.x0_pred[-1])


def test_guidance_composes_with_the_edm_denoiser():
    """Classifier-free guidance on F is the same guided combination of D."""
    x = jax.random.normal(jax.random.key(0), (3, 4))

    def net(x_in, time, labels):
        return x_in * (1.0 + labels[:, None]) + time[:, None] / 100.0

    labels, null = jnp.array([0, 1, 2]), 3
    out = samplers.sample(
        net,
        PROCESS,
        (3, 4),
        jax.random.key(1),
        sampler="edm_euler",
        num_steps=1,
        timestep_spacing="karras",
        labels=labels,
        num_classes=3,
        guidance_scale=2.5,
        clip_x0=False,
        x_init=x,
    )
    d_cond = PROCESS.denoise(lambda a, t: net(a, t, labels), x, 80.0)
    d_null = PROCESS.denoise(lambda a, t: net(a, t, jnp.full((3,), null)), x, 80.0)
    np.testing.assert_allclose(out, d_null + 2.5 * (d_cond - d_null), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- refusals


def test_every_sampler_runs_on_edm_and_discrete_only_choices_are_refused_in_one_line():
    # No sampler belongs to one formulation any more: ddim (a ddpm sampler before) runs on edm,
    # on its default grid ('karras') and on 'linspace' (uniform in sigma up to sigma_max).
    g = _gaussian()
    for spacing in ("", "linspace"):
        out = samplers.sample(
            _optimal_net(g), PROCESS, (2, 4), jax.random.key(0), timestep_spacing=spacing
        )
        assert out.shape == (2, 4) and np.all(np.isfinite(np.asarray(out)))
    net = lambda x, t: x
    cases = [
        ({"timestep_spacing": "leading"}, r"timestep_spacing='leading' picks timesteps of a "),
        ({"gaussian_start_t": 10}, r"gaussian_start_t is a timestep .*gaussian_start_sigma"),
        ({"start_timestep": 10}, r"start_timestep is a timestep of a discrete schedule"),
        ({"prediction": "v"}, r"prediction and learn_sigma describe a ddpm model"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            samplers.sample(net, PROCESS, (2, 4), jax.random.key(0), **kwargs)
        assert "\n" not in str(info.value)


def _edm_config(config):
    config = copy.deepcopy(config)
    config.diffusion.formulation = "edm"
    config.sampling.sampler = "edm_heun"
    config.sampling.timestep_spacing = "karras"
    config.eval.bpd_num_images = 0
    return config


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "diffusion.formulation",
            "vp",
            r"diffusion.formulation='vp'; use one of \('ddpm', 'edm', 'flow'\)",
        ),
        ("diffusion.sigma_data", 0.0, r"diffusion.sigma_data=0.0; use a finite value > 0"),
        ("diffusion.p_std", -1.0, r"diffusion.p_std=-1.0; use a finite value > 0"),
        ("diffusion.prediction", "v", r"diffusion.prediction='v' has no meaning for .*'edm'"),
        ("diffusion.loss_weighting", "snr", r"loss_weighting='snr' has no meaning"),
        ("diffusion.zero_terminal_snr", True, r"zero_terminal_snr=True has no meaning"),
        ("model.learn_sigma", True, r"model.learn_sigma=True has no meaning"),
        ("sampling.timestep_spacing", "leading", r"the edm formulation is continuous"),
        ("sampling.gaussian_start_t", 10, r"set gaussian_start_sigma instead"),
        ("sampling.sigma_min", 100.0, r"sigma_min=100.0 must be below sigma_max=80.0"),
        ("sampling.s_churn", -1.0, r"s_churn must be a number >= 0"),
        ("sampling.s_max", -1.0, r"s_max must be a number >= s_min"),
    ],
)
def test_bad_edm_values_are_refused_in_one_line(tiny_config, key, value, message):
    config = _edm_config(tiny_config)
    validation.validate_config(config, num_devices=1)  # the edm config itself is fine
    section, leaf = key.split(".")
    config[section][leaf] = value
    with pytest.raises(ConfigError, match=message) as info:
        validation.validate_config(config, num_devices=1)
    assert "\n" not in str(info.value)


def test_eval_bits_per_dim_is_refused_and_editing_accepted_for_an_edm_run(tiny_config):
    from diffusion_jax.runner import edit as edit_mode
    from diffusion_jax.runner import evaluate as eval_mode

    config = _edm_config(tiny_config)
    config.eval.bpd_num_images = 10
    with pytest.raises(ConfigError, match="bpd_num_images=0"):
        eval_mode.check_eval(config, 1)
    edit_mode.check_edit(config)  # SDEdit, inpainting and visualize work through its denoiser


# --------------------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def edm_run(shared_edm_run, tmp_path_factory):
    """This module's copy of the session's tiny edm run (6 steps, checkpoints 3 and 6), free to
    write to; its config with the edm sampling settings of `_edm_config` (training is the
    same whatever they are)."""
    workdir = str(tmp_path_factory.mktemp("edm") / "run")
    shutil.copytree(shared_edm_run.workdir, workdir, symlinks=True)
    return workdir, _edm_config(shared_edm_run.fresh_config()), shared_edm_run.state


@pytest.mark.slow
def test_a_tiny_edm_run_trains_with_finite_loss_and_samples_through_the_runner(edm_run):
    workdir, config, state = edm_run
    assert int(state.step) == 6
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["nonfinite_steps"] == 0 for r in records)
    config = copy.deepcopy(config)
    for sampler in ("ddim", "dpm_solver++", "heun"):
        config.sampling.sampler = sampler
        config.sampling.s_churn = 5.0
        path = sample_mode.sample(config, workdir)
        images = np.load(path)["images"]
        assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
    assert os.path.basename(path) == "heun4_churn5_karras_seed0.npz"
    # The deprecated name of EDM's Algorithm 2 is the shared heun with churn: the same file.
    config.sampling.sampler = "edm_stochastic"
    assert sample_mode.sample(config, workdir) == path


@pytest.mark.slow
def test_an_edm_run_resumes_bit_exactly_and_locks_its_formulation(edm_run, tmp_path):
    _, config, straight = edm_run
    config = copy.deepcopy(config)
    resumed_dir = str(tmp_path / "resumed")
    config.training.num_train_steps = 3
    train_mode.train(config, resumed_dir)
    config.training.num_train_steps = 6
    resumed = train_mode.train(config, resumed_dir)
    assert int(resumed.step) == 6
    leaves = zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True)
    for a, b in leaves:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    config.diffusion.formulation = "ddpm"
    config.sampling.sampler = "ddim"
    config.sampling.timestep_spacing = "linspace"
    with pytest.raises(ConfigError, match=r"diffusion\.formulation: 'edm' -> 'ddpm'"):
        train_mode.train(config, resumed_dir)


# --------------------------------------------------------------------------- configs


def test_digits_edm_config_differs_from_digits_only_in_formulation_sampling_and_bpd():
    import json

    from configs import digits, digits_edm

    def flat(config):
        return validation._flatten(json.loads(config.to_json_best_effort()))

    base, new = flat(digits.get_config()), flat(digits_edm.get_config())
    changed = {k for k in base if base[k] != new[k]}
    assert {"diffusion.formulation", "eval.bpd_num_images"} <= changed
    assert all(
        k.startswith("sampling.")
        for k in changed - {"diffusion.formulation", "eval.bpd_num_images"}
    )
    assert new["sampling.sampler"] in samplers.names()


def test_the_formulation_x_sampler_sweep_crosses_every_formulation_with_shared_samplers():
    from configs import digits
    from diffusion_jax.runner import sweeps

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "sweeps")
    points = list(sweeps.load_sweep(os.path.join(path, "formulation_x_sampler.py")))
    assert [(p["diffusion.formulation"], p["sampling.sampler"]) for p in points] == [
        (formulation, sampler)
        for formulation in ("ddpm", "edm", "flow")
        for sampler in ("dpm_solver++2m_sde", "heun", "unipc")
    ]
    config = digits.get_config()
    config.eval.bpd_num_images = 0
    sweeps.validate_points(config, points)


def test_label_dropout_replaces_labels_by_the_null_class_in_the_edm_loss():
    x0 = jnp.zeros((64, 2))
    seen = []

    def net(x_in, time, labels):
        seen.append(labels)
        return jnp.zeros_like(x_in)

    PROCESS.training_loss(net, x0, jax.random.key(0), labels=jnp.arange(64) % 3, num_classes=3)
    PROCESS.training_loss(
        net, x0, jax.random.key(0), labels=jnp.arange(64) % 3, num_classes=3, label_dropout=1.0
    )
    PROCESS.training_loss(
        net, x0, jax.random.key(0), labels=jnp.arange(64) % 3, num_classes=3, label_dropout=0.5
    )
    np.testing.assert_array_equal(seen[0], np.arange(64) % 3)
    np.testing.assert_array_equal(seen[1], np.full(64, 3))
    dropped = np.asarray(seen[2]) == 3
    assert 10 < dropped.sum() < 54
    np.testing.assert_array_equal(np.asarray(seen[2])[~dropped], (np.arange(64) % 3)[~dropped])


@pytest.mark.slow
def test_a_class_conditional_edm_run_samples_with_guidance(digits_data_dir, tmp_path):
    from tests.conftest import make_tiny_config

    config = _edm_config(make_tiny_config(digits_data_dir))
    config.model.class_conditional = True
    config.training.num_train_steps = 2
    config.training.checkpoint_every = 2
    config.sampling.guidance_scale = 2.0
    config.sampling.label = 3
    workdir = str(tmp_path / "run")
    train_mode.train(config, workdir)
    path = sample_mode.sample(config, workdir)
    assert os.path.basename(path) == "heun4_karras_g2_label3_seed0.npz"
    assert np.load(path)["images"].shape == (6, 8, 8, 1)
