"""SDEdit and RePaint inpainting: exactness, consistency with the samplers, per-sample noise,
statistics against a correlated Gaussian whose optimal denoiser is closed form, the edit modes
on a tiny trained digits run, and argument errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import diffusion, editing, samplers, schedules
from diffusion_jax.errors import ConfigError
from diffusion_jax.runner import edit as edit_mode
from diffusion_jax.testing import gaussian_oracle

MU, S = 0.3, 0.5
SCH = schedules.get_schedule("linear", 100)
GAUSS = gaussian_oracle.optimal_model(SCH, MU, S)


def _images(batch: int = 4, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, (batch, 4, 4, 1)), jnp.float32)


def _keep(batch: int, name: str = "left_half") -> np.ndarray:
    return np.broadcast_to(editing.known_mask(name, 4, 4), (batch, 4, 4, 1))


def _input_noise(rng: jax.Array, batch: int, shape: tuple[int, ...]) -> jax.Array:
    """The documented draw sdedit noises sample i with: N(0, I) from fold_in(fold_in(rng, i), 0)."""
    return jax.vmap(
        lambda i: jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), 0), shape)
    )(jnp.arange(batch))


def _raising_model(x: jax.Array, t: jax.Array, *labels: Any) -> jax.Array:
    raise AssertionError("the model must not be traced when the arguments are bad")


# --------------------------------------------------------------------------- sdedit


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver++"])
def test_sdedit_with_strength_zero_returns_the_input_exactly(sampler: str) -> None:
    x0 = _images()
    out = editing.sdedit(
        _raising_model, SCH, x0, jax.random.key(0), strength=0.0, sampler=sampler, num_steps=10
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x0))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sdedit_with_strength_one_is_sampling_from_the_noised_input(sampler: str) -> None:
    x0, rng = _images(), jax.random.key(3)
    out = editing.sdedit(GAUSS, SCH, x0, rng, strength=1.0, sampler=sampler, num_steps=8)
    t_last = jnp.full((4,), SCH.num_timesteps - 1)
    x_init = diffusion.q_sample(SCH, x0, t_last, _input_noise(rng, 4, (4, 4, 1)))
    ref = samplers.sample(GAUSS, SCH, x0.shape, rng, sampler=sampler, num_steps=8, x_init=x_init)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_sdedit_integrates_the_ode_from_the_noised_input_at_t_s() -> None:
    # Deterministic DDIM on every timestep from t_s = round(0.4 * 99) = 40 approximates the exact
    # PF-ODE solution from x_{t_s}; starting anywhere else would be far off.
    x0, rng = 0.8 * _images(8), jax.random.key(5)
    out = editing.sdedit(
        GAUSS, SCH, x0, rng, strength=0.4, sampler="heun", num_steps=41, clip_x0=False
    )
    t_s = editing.sdedit_timestep(SCH.num_timesteps, 0.4)
    assert t_s == 40
    x_ts = diffusion.q_sample(SCH, x0, jnp.full((8,), t_s), _input_noise(rng, 8, (4, 4, 1)))
    exact = gaussian_oracle.exact_ode_solution(SCH, np.asarray(x_ts), t_s, MU, S)
    assert np.max(np.abs(np.asarray(out) - exact)) < 2e-3
    wrong_start = gaussian_oracle.exact_ode_solution(SCH, np.asarray(x_ts), t_s + 10, MU, S)
    assert np.max(np.abs(np.asarray(out) - wrong_start)) > 2e-2


def test_sdedit_with_low_strength_stays_closer_to_the_input() -> None:
    x0, rng = _images(16), jax.random.key(1)
    dist = [
        float(jnp.mean(jnp.abs(editing.sdedit(GAUSS, SCH, x0, rng, strength=s, num_steps=20) - x0)))
        for s in (0.1, 0.5, 1.0)
    ]
    assert dist[0] < dist[1] < dist[2]


# --------------------------------------------------------------------------- inpaint


@pytest.mark.parametrize("name", editing.MASKS)
def test_inpaint_keeps_the_known_pixels_exactly(name: str) -> None:
    x0 = _images()
    keep = _keep(4, name)
    out = np.asarray(
        editing.inpaint(GAUSS, SCH, x0, keep, jax.random.key(0), num_steps=10, resample_steps=2)
    )
    np.testing.assert_array_equal(out[keep], np.asarray(x0)[keep])
    assert not np.allclose(out[~keep], np.asarray(x0)[~keep], atol=1e-2)
    assert np.all(np.abs(out) <= 1.0)


def test_inpaint_accepts_float_and_per_channel_masks() -> None:
    x0 = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
    keep = np.broadcast_to(editing.known_mask("center", 4, 4), (2, 4, 4, 3)).astype(np.float32)
    out = np.asarray(editing.inpaint(GAUSS, SCH, x0, keep, jax.random.key(0), num_steps=5))
    np.testing.assert_array_equal(out[keep == 1], np.asarray(x0)[keep == 1])


def test_inpaint_with_a_learned_variance_model() -> None:
    # Prediction channels first, then variance values; v = -1 selects the lower bound, the
    # clipped posterior variance, i.e. 'fixed_small' on every step that adds noise.
    def two_channel(x: jax.Array, t: jax.Array) -> jax.Array:
        return jnp.concatenate([GAUSS(x, t), -jnp.ones_like(x)], axis=-1)

    x0, keep, rng = _images(3), _keep(3), jax.random.key(4)
    args = {"num_steps": 8, "resample_steps": 2}
    fixed = editing.inpaint(GAUSS, SCH, x0, keep, rng, **args)
    split = editing.inpaint(two_channel, SCH, x0, keep, rng, learn_sigma=True, **args)
    np.testing.assert_array_equal(split, fixed)
    learned = editing.inpaint(
        two_channel, SCH, x0, keep, rng, learn_sigma=True, variance="learned_range", **args
    )
    np.testing.assert_allclose(learned, fixed, atol=1e-5)
    with pytest.raises(ValueError, match="learn_sigma=True"):
        editing.inpaint(two_channel, SCH, x0, keep, rng, **args)


def test_known_mask_regenerates_the_named_region() -> None:
    keep = editing.known_mask("left_half", 4, 6)[..., 0]
    assert keep.shape == (4, 6) and not keep[:, :3].any() and keep[:, 3:].all()
    assert not editing.known_mask("top_half", 4, 4)[:2].any()
    assert editing.known_mask("bottom_half", 4, 4)[:2].all()
    assert not editing.known_mask("right_half", 4, 4)[:, 2:].any()
    center = editing.known_mask("center", 8, 8)[..., 0]
    assert not center[2:6, 2:6].any() and center.sum() == 64 - 16


def test_edits_are_reproducible_and_independent_of_the_batch() -> None:
    x0, rng = _images(6), jax.random.key(7)
    keep = _keep(6)

    @jax.jit
    def both(x: jax.Array, keep: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        sd = editing.sdedit(
            GAUSS, SCH, x, rng, strength=0.6, sampler="ddpm", num_steps=6, sample_ids=ids
        )
        ip = editing.inpaint(
            GAUSS, SCH, x, keep, rng, num_steps=6, resample_steps=3, sample_ids=ids
        )
        return sd, ip

    sd_all, ip_all = both(x0, keep, jnp.arange(6))
    sd_again, ip_again = both(x0, keep, jnp.arange(6))
    np.testing.assert_array_equal(sd_all, sd_again)
    np.testing.assert_array_equal(ip_all, ip_again)
    pick = np.array([4, 1, 5])
    sd_sub, ip_sub = both(x0[pick], keep[pick], jnp.asarray(pick))
    np.testing.assert_allclose(sd_sub, sd_all[pick], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ip_sub, ip_all[pick], rtol=1e-6, atol=1e-6)
    other = editing.inpaint(GAUSS, SCH, x0, keep, jax.random.key(8), num_steps=6, resample_steps=3)
    assert not np.allclose(other, ip_all)


def test_repaint_schedule_resamples_every_noisy_state() -> None:
    n, u = 6, 3
    step, jump = editing.repaint_schedule(n, u, 1)
    assert len(step) == n + (u - 1) * (n - 1)
    # Every state but the output's predecessor's successor is left u times; jumps go back by 1.
    np.testing.assert_array_equal(np.bincount(step), [u] * (n - 1) + [1])
    assert np.all((jump == step) | (jump == step + 1))
    assert step[-1] == n - 1 and np.all(jump[-1] == step[-1])
    # Jumps of j states: from state e back to e - j, for e = N - 1, N - 1 - j, ...
    step, jump = editing.repaint_schedule(7, 2, 3)
    jumps = [(int(f), int(s)) for s, f in zip(step, jump, strict=True) if f != s]
    assert jumps == [(3, 0), (6, 3)]
    np.testing.assert_array_equal(editing.repaint_schedule(5, 1, 2)[0], np.arange(5))


def test_inpaint_traces_the_model_once_in_one_scan() -> None:
    traces = []

    def counting(x: jax.Array, t: jax.Array) -> jax.Array:
        traces.append(1)
        return GAUSS(x, t)

    x0 = _images(2)
    jaxpr = jax.make_jaxpr(
        lambda x: editing.inpaint(counting, SCH, x, _keep(2), jax.random.key(0), num_steps=50)
    )(x0)
    assert len(traces) == 1
    assert str(jaxpr).count("scan") == 1


def _correlated_model(cov: np.ndarray) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Optimal eps model for zero-mean Gaussian data with covariance `cov` over the H*W*C
    pixels: E[x0 | x_t] = a cov (a^2 cov + sigma^2 I)^-1 x_t."""
    c = jnp.asarray(cov, jnp.float32)
    eye = jnp.eye(c.shape[0])

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        ab = jnp.asarray(SCH.alphas_cumprod, jnp.float32)[t][:, None, None]
        a, sig2 = jnp.sqrt(ab), 1.0 - ab
        x = x_t.reshape(x_t.shape[0], -1)
        x0 = a[:, :, 0] * jnp.einsum(
            "ij,bj->bi", c, jnp.linalg.solve(a * a * c + sig2 * eye, x[..., None])[..., 0]
        )
        return ((x - a[:, :, 0] * x0) / jnp.sqrt(sig2[:, :, 0])).reshape(x_t.shape)

    return model_fn


def test_resampling_brings_the_inpainted_pixel_to_its_conditional_mean() -> None:
    # Two pixels with correlation 0.9; the first is known (0.5), the second regenerated. Its
    # conditional mean is 0.9 * 0.5 = 0.45. Without resampling (U = 1) the known pixel's
    # information barely reaches it (RePaint's motivation); with U = 10 it does.
    rho, s, batch = 0.9, 0.5, 1000
    model = _correlated_model(s**2 * np.array([[1.0, rho], [rho, 1.0]]))
    x0 = jnp.tile(jnp.asarray([0.5, 0.0], jnp.float32).reshape(1, 1, 2, 1), (batch, 1, 1, 1))
    keep = np.broadcast_to(np.array([True, False]).reshape(1, 1, 2, 1), x0.shape)

    def mean_of_regenerated(resample_steps: int) -> float:
        out = editing.inpaint(
            model,
            SCH,
            x0,
            keep,
            jax.random.key(0),
            num_steps=100,
            resample_steps=resample_steps,
            clip_x0=False,
        )
        return float(jnp.mean(out[:, 0, 1, 0]))

    target = rho * 0.5
    assert abs(mean_of_regenerated(10) - target) < 0.03
    assert abs(mean_of_regenerated(1) - target) > 0.1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strength": 1.5}, "strength must be a number in \\[0, 1\\]"),
        ({"strength": -0.1}, "strength must be"),
        ({"strength": 0.5, "sampler": "no_such_sampler"}, "unknown sampler"),
        ({"strength": 0.0, "num_steps": 101}, "num_steps must be an integer in \\[1, 100\\]"),
        ({"strength": 0.5, "x_init": jnp.zeros((2, 4, 4, 1))}, "sdedit sets \\['x_init'\\]"),
        ({"strength": 0.5, "labels": jnp.zeros((3,), jnp.int32)}, "labels must have shape"),
        ({"strength": 0.5, "guidance_scale": 2.0}, "needs labels"),
    ],
)
def test_sdedit_rejects_bad_arguments_before_tracing(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        editing.sdedit(_raising_model, SCH, _images(2), jax.random.key(0), **kwargs)


@pytest.mark.parametrize(
    ("mask", "kwargs", "match"),
    [
        (np.ones((2, 4, 4, 2), bool), {}, "mask must have shape"),
        (np.ones((2, 4, 5, 1), bool), {}, "mask must have shape"),
        (np.full((2, 4, 4, 1), 2.0), {}, "mask values must lie in \\[0, 1\\]"),
        (np.ones((2, 4, 4, 1), bool), {"resample_steps": 0}, "resample_steps must be an integer"),
        (np.ones((2, 4, 4, 1), bool), {"jump_length": 0}, "jump_length must be an integer"),
        (np.ones((2, 4, 4, 1), bool), {"num_steps": 0}, "num_steps must be an integer"),
        (np.ones((2, 4, 4, 1), bool), {"variance": "big"}, "unknown variance"),
        (np.ones((2, 4, 4, 1), bool), {"variance": "learned_range"}, "learn_sigma=True"),
    ],
)
def test_inpaint_rejects_bad_arguments_before_tracing(
    mask: np.ndarray, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        editing.inpaint(_raising_model, SCH, _images(2), mask, jax.random.key(0), **kwargs)


def test_unknown_mask_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown mask 'diagonal'; use one of"):
        editing.known_mask("diagonal", 8, 8)


# --------------------------------------------------------------------------- modes


def _edit_config(config: ml_collections.ConfigDict, **edit: Any) -> ml_collections.ConfigDict:
    """`config` with its edit section replaced (the section's field types may change)."""
    section = config.edit.to_dict()
    section.update({"num_images": 3, "resample_steps": 2, **edit})
    config.edit = ml_collections.ConfigDict(section)
    return config


@pytest.mark.slow
def test_sdedit_mode_writes_a_grid_and_the_edits(
    trained_tiny_run: tuple[str, ml_collections.ConfigDict],
) -> None:
    workdir, config = trained_tiny_run
    config = _edit_config(config, strength=(0.0, 0.6))
    png, npz = edit_mode.sdedit_mode(config, workdir)
    assert os.path.dirname(png) == os.path.join(workdir, "edits")
    data = np.load(npz)
    assert data["outputs"].shape == (2, 3, 8, 8, 1) and data["outputs"].dtype == np.uint8
    np.testing.assert_array_equal(data["outputs"][0], data["inputs"])  # strength 0
    assert not np.array_equal(data["outputs"][1], data["inputs"])
    with Image.open(png) as image:
        image.load()
        # 3 columns and 3 rows (inputs, 2 strengths) of 8x8 tiles with 1-pixel gaps, upscaled.
        assert image.size[0] == image.size[1] and image.size[0] % 28 == 0


@pytest.mark.slow
def test_inpaint_mode_keeps_the_digits_unmasked_pixels(
    trained_tiny_run: tuple[str, ml_collections.ConfigDict],
) -> None:
    workdir, config = trained_tiny_run
    config = _edit_config(config, mask="top_half")
    png, npz = edit_mode.inpaint_mode(config, workdir)
    data = np.load(npz)
    keep = np.broadcast_to(data["keep_mask"], data["inputs"].shape)
    assert keep.shape == (3, 8, 8, 1) and not keep[:, :4].any() and keep[:, 4:].all()
    np.testing.assert_array_equal(data["outputs"][keep], data["inputs"][keep])
    np.testing.assert_array_equal(data["masked"][~keep], 128)
    with Image.open(png) as image:
        image.load()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"mask": "diagonal"}, "edit.mask='diagonal'; use one of"),
        ({"strength": 1.5}, "edit.strength=1.5; use numbers in \\[0, 1\\]"),
        ({"strength": (0.2, -1.0)}, "edit.strength=\\(0.2, -1.0\\)"),
        ({"num_images": 0}, "edit.num_images=0; use 1 or more"),
        ({"resample_steps": 0}, "edit.resample_steps=0"),
        ({"split": ""}, "edit.split=''"),
        ({"jump_length": 0}, "edit.jump_length=0"),
    ],
)
def test_bad_edit_config_is_one_line_naming_the_key(edit: dict[str, Any], match: str) -> None:
    from configs import digits

    config = _edit_config(digits.get_config(), **edit)
    with pytest.raises(ConfigError, match=match) as info:
        edit_mode.check_edit(config, 1)
    assert "\n" not in str(info.value)


def test_edit_modes_reject_a_bad_config_before_loading(tmp_path: Any) -> None:
    from configs import digits

    config = _edit_config(digits.get_config(), mask="diagonal")
    with pytest.raises(ConfigError, match=r"edit\.mask"):
        edit_mode.inpaint_mode(config, str(tmp_path / "nothing_here"))
