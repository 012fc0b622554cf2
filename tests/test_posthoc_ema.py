"""Post-hoc EMA (EDM2): the power-function EMA against its closed form, sigma_rel <-> gamma, the
least-squares reconstruction, and a tiny run: snapshots, resume, --mode=posthoc_ema, sampling."""

from __future__ import annotations

import glob
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analysis, checkpointing, posthoc_ema, train_state
from diffusion_jax.errors import ConfigError, NoCheckpointError
from diffusion_jax.runner import ema_snapshots, posthoc, validation
from diffusion_jax.runner import sample as sample_mode
from diffusion_jax.runner import train as train_mode
from diffusion_jax.runner.setup import ModelSetup
from tests.conftest import TINY_OVERRIDES, make_tiny_config
from tests.test_cli import _run_cli, _summary


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


# --- sigma_rel <-> gamma -------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0, 6.94, 16.97, 100.0])
def test_gamma_sigma_rel_round_trip(gamma):
    sigma_rel = posthoc_ema.gamma_to_sigma_rel(gamma)
    assert posthoc_ema.sigma_rel_to_gamma(sigma_rel) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


def test_sigma_rel_of_the_papers_two_tracked_emas():
    # Karras et al. 2024 track gamma = 16.97 and 6.94, i.e. sigma_rel 0.05 and 0.10.
    assert posthoc_ema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert posthoc_ema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)


def test_profile_width_is_its_relative_standard_deviation():
    # The profile (gamma + 1) tau^gamma on [0, 1]: its standard deviation, by quadrature.
    gamma = 4.0
    tau = (np.arange(200_000) + 0.5) / 200_000
    p = (gamma + 1.0) * tau**gamma / 200_000
    mean = np.sum(p * tau)
    std = np.sqrt(np.sum(p * (tau - mean) ** 2))
    assert posthoc_ema.gamma_to_sigma_rel(gamma) == pytest.approx(std, rel=1e-6)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, 0.3, float("nan")])
def test_sigma_rel_out_of_range_is_refused_naming_the_range(sigma_rel):
    with pytest.raises(ConfigError, match=r"use a value in \(0, 0\.2887\]"):
        posthoc_ema.sigma_rel_to_gamma(sigma_rel)


# --- the tracked EMA -----------------------------------------------------------------------


def test_power_ema_updates_equal_the_closed_form_weighted_average():
    """Constant, then linear parameters: the float32 per-step updates against
    sum_k (k^(g+1) - (k-1)^(g+1)) / t^(g+1) theta_k in float64, at every step."""
    gammas = (posthoc_ema.sigma_rel_to_gamma(0.05), posthoc_ema.sigma_rel_to_gamma(0.10))
    num = 300
    k = np.arange(1, num + 1, dtype=np.float64)
    base = np.linspace(-1.0, 1.0, 5)
    thetas = base[None, :] + np.maximum(k - 100.0, 0.0)[:, None] * 0.01  # (num, 5)
    update = jax.jit(lambda emas, p, step: posthoc_ema.update(emas, p, step, gammas))
    emas = ({"w": jnp.full(5, 123.0)}, {"w": jnp.full(5, -7.0)})  # replaced by the first update
    for step in range(num):
        emas = update(emas, {"w": jnp.asarray(thetas[step], jnp.float32)}, step)
        t = step + 1
        for ema, gamma in zip(emas, gammas, strict=True):
            weights = posthoc_ema.power_ema_weights(t, gamma)
            expected = weights @ thetas[:t]
            np.testing.assert_allclose(np.asarray(ema["w"]), expected, rtol=2e-6, atol=2e-6)
    # And against the average in closed form of the whole sequence: constant c up to step 100,
    # then c + 0.01 (k - 100), under weights w_k = (k^e - (k-1)^e) / t^e (e = gamma + 1):
    # sum_k w_k max(k - 100, 0) = sum_(k > 100) (k - 100) w_k computed from the telescoping sum.
    e = gammas[1] + 1.0
    tail = sum((j**e - (j - 1) ** e) * (j - 100.0) for j in range(101, num + 1)) / num**e
    np.testing.assert_allclose(np.asarray(emas[1]["w"]), base + 0.01 * tail, rtol=2e-6, atol=2e-6)


def test_closed_form_weights_are_the_profile_integrated_over_each_step():
    gamma, num = 6.94, 50
    weights = posthoc_ema.power_ema_weights(num, gamma)
    assert weights.sum() == pytest.approx(1.0, rel=1e-12)
    # Midpoint quadrature of (gamma + 1) tau^gamma / t^(gamma + 1) over [k - 1, k].
    sub = (np.arange(1000) + 0.5) / 1000
    for k in (1, 10, 50):
        tau = k - 1 + sub
        integral = np.mean((gamma + 1.0) * tau**gamma / num ** (gamma + 1.0))
        assert weights[k - 1] == pytest.approx(integral, rel=1e-5)


def test_update_weight_is_accurate_late_in_long_runs():
    # 1 - (1 - 1/t)^(gamma + 1) at t = 10^6 loses most digits in float32; the expm1 form does not.
    gamma, t = 6.94, 1_000_000
    exact = -np.expm1((gamma + 1.0) * np.log1p(-1.0 / t))
    got = float(posthoc_ema.update_weight(jnp.int32(t - 1), gamma))
    assert got == pytest.approx(exact, rel=1e-6)
    assert float(posthoc_ema.update_weight(jnp.int32(0), gamma)) == 1.0


# --- reconstruction ------------------------------------------------------------------------


def _toy_run(num, every, gammas, seed=0):
    """Parameters of 3 values drifting over `num` steps, and snapshots of their power EMAs."""
    rng = np.random.default_rng(seed)
    k = np.arange(1, num + 1, dtype=np.float64)
    thetas = np.stack([np.sin(k / 300.0), np.exp(-k / 500.0), np.log(k)], 1)
    thetas += 0.1 * rng.standard_normal(thetas.shape)
    snapshots = []
    for t in range(every, num + 1, every):
        for g in gammas:
            snapshots.append((t, g, posthoc_ema.power_ema_weights(t, g) @ thetas[:t]))
    return thetas, snapshots


def test_reconstructing_a_tracked_profile_picks_its_snapshot():
    gammas = (16.97, 6.94)
    _, snapshots = _toy_run(200, 20, gammas)
    steps = [s[0] for s in snapshots]
    gs = [s[1] for s in snapshots]
    x = posthoc_ema.reconstruction_coefficients(steps, gs, 200, 6.94)
    expected = np.zeros(len(snapshots))
    expected[-1] = 1.0
    np.testing.assert_allclose(x, expected, atol=1e-7)
    assert posthoc_ema.reconstruction_error(steps, gs, x, 200, 6.94) < 1e-6


@pytest.mark.parametrize("sigma_rel", [0.07, 0.15])
def test_reconstruction_of_an_untracked_length_is_close_to_the_direct_ema(sigma_rel):
    gammas = (posthoc_ema.sigma_rel_to_gamma(0.05), posthoc_ema.sigma_rel_to_gamma(0.10))
    num = 2000
    thetas, snapshots = _toy_run(num, 50, gammas)
    gamma = posthoc_ema.sigma_rel_to_gamma(sigma_rel)
    x = posthoc_ema.reconstruction_coefficients(
        [s[0] for s in snapshots], [s[1] for s in snapshots], num, gamma
    )
    reconstructed = sum(c * s[2] for c, s in zip(x, snapshots, strict=True))
    direct = posthoc_ema.power_ema_weights(num, gamma) @ thetas
    # The EMAs of sigma_rel 0.05 .. 0.15 differ by ~0.1 here; the reconstruction is 50x closer.
    np.testing.assert_allclose(reconstructed, direct, atol=2e-3)
    assert np.max(np.abs(direct - snapshots[-1][2])) > 0.02  # not just the tracked 0.10


def test_inner_products_match_quadrature():
    t_i, g_i, t_j, g_j = 120.0, 3.0, 80.0, 7.5
    got = posthoc_ema.profile_inner_products([t_i], [g_i], [t_j], [g_j])[0, 0]
    tau = (np.arange(400_000) + 0.5) / 400_000 * t_j  # the product vanishes beyond min(t_i, t_j)
    p_i = (g_i + 1) * tau**g_i / t_i ** (g_i + 1)
    p_j = (g_j + 1) * tau**g_j / t_j ** (g_j + 1)
    assert got == pytest.approx(np.mean(p_i * p_j) * t_j, rel=1e-6)


# --- checkpoints of runs saved before the feature ------------------------------------------


@flax.struct.dataclass
class _StateBefore:
    """`TrainState` as saved before post-hoc EMA existed (no `posthoc_emas` field)."""

    step: jax.Array
    params: dict
    opt_state: dict
    ema_params: dict
    rng: jax.Array
    nonfinite_steps: jax.Array
    consecutive_nonfinite: jax.Array


def test_a_checkpoint_saved_before_posthoc_ema_existed_restores(tmp_path):
    fields = dict(
        step=jnp.int32(7),
        params={"w": jnp.arange(3.0)},
        opt_state={"m": jnp.ones(3)},
        ema_params={"w": jnp.full(3, 2.0)},
        rng=jax.random.PRNGKey(0),
        nonfinite_steps=jnp.int32(0),
        consecutive_nonfinite=jnp.int32(0),
    )
    checkpointer = checkpointing.Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(7, _StateBefore(**fields))
    checkpointer.wait_until_finished()
    abstract = jax.eval_shape(lambda: train_state.TrainState(**fields))
    restored = checkpointer.restore(abstract)
    checkpointer.close()
    assert isinstance(restored, train_state.TrainState) and restored.posthoc_emas == ()
    np.testing.assert_array_equal(restored.ema_params["w"], [2.0, 2.0, 2.0])
    assert int(restored.step) == 7


# --- a tiny run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def posthoc_runs(digits_data_dir, tmp_path_factory):
    """A tiny run with post-hoc EMA (snapshots every 2 steps, checkpoints 3 and 6) trained
    straight, and the same run interrupted after step 3 and resumed."""
    config = make_tiny_config(digits_data_dir)
    config.training.posthoc_ema_every = 2
    root = tmp_path_factory.mktemp("posthoc")
    straight_dir, resumed_dir = str(root / "straight"), str(root / "resumed")
    straight = train_mode.train(config, straight_dir)

    # The interrupted run: trained to 6, then its checkpoint 6 lost (as if killed after writing
    # snapshots 4 and 6 but before the checkpoint), snapshot 4 replaced by different values.
    train_mode.train(config, resumed_dir)
    checkpoint6 = os.path.join(checkpointing.checkpoint_dir(resumed_dir), "6")
    os.rename(checkpoint6, os.path.join(root, "checkpoint6_set_aside"))
    with np.load(ema_snapshots.snapshot_path(resumed_dir, 4)) as stored:
        damaged = {k: (v + 1.0 if k.startswith("ema") else v) for k, v in stored.items()}
    np.savez(ema_snapshots.snapshot_path(resumed_dir, 4), **damaged)
    resumed = train_mode.train(config, resumed_dir)  # resumes from checkpoint 3
    return config, straight_dir, straight, resumed_dir, resumed


@pytest.mark.slow
def test_train_state_tracks_posthoc_emas_and_writes_snapshots(posthoc_runs):
    _, straight_dir, straight, _, _ = posthoc_runs
    assert len(straight.posthoc_emas) == 2
    assert ema_snapshots.snapshot_steps(straight_dir) == [2, 4, 6]
    sigma_rels, gammas = ema_snapshots.read_snapshot_profiles(straight_dir, 6)
    np.testing.assert_array_equal(sigma_rels, [0.05, 0.10])
    np.testing.assert_allclose(gammas, [16.97, 6.94], atol=5e-3)


@pytest.mark.slow
def test_posthoc_emas_in_the_train_step_equal_the_closed_form_over_the_params(tiny_config):
    tiny_config.training.posthoc_ema_every = 1
    setup = ModelSetup(tiny_config)
    state = setup.init_state(jax.random.PRNGKey(0))
    step_fn = setup.train_step()
    rng = np.random.default_rng(0)
    params = []
    for _ in range(4):
        batch = {
            "image": jnp.asarray(rng.uniform(-1, 1, (16, 8, 8, 1)), jnp.float32),
            "label": jnp.zeros((16,), jnp.int32),
        }
        state, _ = step_fn(state, batch)
        params.append(jax.device_get(state.params))
    for ema, gamma in zip(state.posthoc_emas, setup.posthoc_gammas, strict=True):
        weights = posthoc_ema.power_ema_weights(4, gamma)

        def average(*ps, weights=weights):
            return sum(w * np.asarray(p, np.float64) for w, p in zip(weights, ps, strict=True))

        expected = jax.tree.map(average, *params)
        for got, want in zip(_leaves(ema), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_resume_with_posthoc_ema_is_bit_exact_and_replaces_later_snapshots(posthoc_runs):
    _, straight_dir, straight, resumed_dir, resumed = posthoc_runs
    for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ema_snapshots.snapshot_steps(resumed_dir) == [2, 4, 6]
    for step in (2, 4, 6):
        with (
            np.load(ema_snapshots.snapshot_path(straight_dir, step)) as a,
            np.load(ema_snapshots.snapshot_path(resumed_dir, step)) as b,
        ):
            assert sorted(a) == sorted(b)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_reconstructing_a_tracked_sigma_rel_matches_the_tracked_ema(posthoc_runs, tmp_path):
    config, straight_dir, straight, _, _ = posthoc_runs
    workdir = str(tmp_path / "run")
    shutil.copytree(straight_dir, workdir)
    for i, sigma_rel in enumerate((0.05, 0.10)):
        config.posthoc_ema.sigma_rel = sigma_rel
        posthoc.posthoc_ema_mode(config, workdir)
        params, step = ema_snapshots.read_params(workdir, sigma_rel, straight.ema_params)
        assert step == 6
        for got, tracked in zip(_leaves(params), _leaves(straight.posthoc_emas[i]), strict=True):
            np.testing.assert_allclose(got, tracked, rtol=3e-7, atol=1e-8)


@pytest.mark.slow
def test_posthoc_mode_then_sample_with_the_reconstructed_params(posthoc_runs, tmp_path):
    config, straight_dir, _, _, _ = posthoc_runs
    workdir = str(tmp_path / "run")
    shutil.copytree(straight_dir, workdir)
    config.posthoc_ema.sigma_rel = 0.08
    path = posthoc.posthoc_ema_mode(config, workdir)
    assert path == os.path.join(workdir, "posthoc_ema", "sigma_rel0.08.npz")
    assert not glob.glob(os.path.join(workdir, "posthoc_ema", "*.tmp*"))

    # The sampling config need not repeat the training run's post-hoc flags.
    sample_config = make_tiny_config(config.data.data_dir)
    sample_config.sampling.params = "posthoc_ema:0.08"
    out = sample_mode.sample(sample_config, workdir)
    assert out.endswith("_phema0.08_seed0.npz")
    images = np.load(out)["images"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    sample_config.sampling.params = "ema"
    regular = np.load(sample_mode.sample(sample_config, workdir))["images"]
    assert not np.array_equal(images, regular)  # other parameters, other samples

    run = analysis.load_run(workdir, params="posthoc_ema:0.08")  # the notebook API
    with np.load(path) as stored:
        np.testing.assert_array_equal(stored["conv_in/kernel"], run.params["conv_in"]["kernel"])

    sample_config.sampling.params = "posthoc_ema:0.09"
    with pytest.raises(NoCheckpointError, match=r"--config\.posthoc_ema\.sigma_rel=0\.09"):
        sample_mode.sample(sample_config, workdir)


def test_posthoc_mode_refuses_a_workdir_without_enough_snapshots(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(NoCheckpointError, match="posthoc_ema_every=N"):
        posthoc.posthoc_ema_mode(tiny_config, workdir)
    os.makedirs(ema_snapshots.snapshot_dir(workdir))
    np.savez(ema_snapshots.snapshot_path(workdir, 6), gammas=np.array([6.94]))
    with pytest.raises(NoCheckpointError, match="only one post-hoc EMA snapshot"):
        posthoc.posthoc_ema_mode(tiny_config, workdir)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"posthoc_ema.sigma_rel": 0.5}, r"posthoc_ema\.sigma_rel: sigma_rel=0\.5; use a value in"),
        ({"training.posthoc_ema_every": -1}, r"posthoc_ema_every=-1; use an integer >= 0"),
        (
            {"training.posthoc_ema_every": 10, "training.posthoc_ema_sigma_rels": (0.05, 0.0)},
            r"posthoc_ema_sigma_rels: sigma_rel=0\.0; use a value in",
        ),
        (
            {"training.posthoc_ema_every": 10, "training.posthoc_ema_sigma_rels": ()},
            r"posthoc_ema_sigma_rels is empty",
        ),
        ({"sampling.params": "posthoc:0.1"}, r"use 'ema' .* or 'posthoc_ema:<sigma_rel>'"),
    ],
)
def test_bad_posthoc_values_are_refused_naming_the_fix(tiny_config, overrides, message):
    for key, value in overrides.items():
        section, leaf = key.split(".")
        tiny_config[section][leaf] = value
    validators = (*validation.TRAINING_VALIDATORS, validation.check_posthoc_ema)
    with pytest.raises(ConfigError, match=message):
        validation.validate(tiny_config, 1, validators)


def test_turning_posthoc_ema_on_when_resuming_a_run_without_it_is_refused(shared_tiny_run):
    config = shared_tiny_run.fresh_config()
    config.training.posthoc_ema_every = 2
    with pytest.raises(ConfigError, match="posthoc_ema_every"):
        train_mode.train(config, shared_tiny_run.workdir)  # refused before writing anything


@pytest.mark.slow
def test_posthoc_ema_command_writes_the_reconstruction_and_refuses_bad_input_in_one_line(
    posthoc_runs, digits_data_dir, tmp_path
):
    _, straight_dir, _, _, _ = posthoc_runs
    workdir = str(tmp_path / "run")
    shutil.copytree(straight_dir, workdir)
    common = [f"--workdir={workdir}", f"--config.data.data_dir={digits_data_dir}", *TINY_OVERRIDES]
    result = _run_cli(*common, "--mode=posthoc_ema", "--config.posthoc_ema.sigma_rel=0.12")
    assert _summary(result).endswith(f"Wrote {workdir}/posthoc_ema/sigma_rel0.12.npz")

    bad = _run_cli(*common, "--mode=posthoc_ema", "--config.posthoc_ema.sigma_rel=0.4")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: posthoc_ema.sigma_rel: sigma_rel=0.4; use a value in (0, 0.2887] "
        "(EDM2 uses 0.05-0.2)"
    )
