"""Learned variance (Improved DDPM): the 2C-channel U-Net, 'learned_range', the hybrid loss and
sampling with a learn_sigma model."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, samplers, schedules
from diffusion_jax.models.unet import UNet
from diffusion_jax.runner import loading
from diffusion_jax.runner.validation import ConfigError, validate_config

SCH = schedules.get_schedule("cosine", 100)


def test_learn_sigma_unet_outputs_twice_the_channels() -> None:
    x, t = jnp.zeros((2, 4, 4, 3)), jnp.zeros((2,), jnp.int32)
    shapes = {}
    for learn_sigma in (False, True):
        model = UNet(
            ch=32,
            ch_mult=(1,),
            num_res_blocks=1,
            attn_resolutions=(),
            dropout=0.0,
            learn_sigma=learn_sigma,
        )
        params = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, t, train=False))
        shapes[learn_sigma] = jax.eval_shape(
            lambda p, m=model: m.apply(p, x, t, train=False), params
        ).shape
    assert shapes == {False: (2, 4, 4, 3), True: (2, 4, 4, 6)}


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_learned_range_frac_zero_and_one_give_min_and_max_log_variance_exactly(prediction) -> None:
    t = jnp.array([0, 1, 50, 99])
    x_t = jax.random.normal(jax.random.key(0), (4, 3, 3, 2))
    pred = jax.random.normal(jax.random.key(1), x_t.shape)
    # min: the posterior variance, clipped at t = 0 to t = 1's; max: beta_t
    lows = np.log(SCH.posterior_variance[[1, 1, 50, 99]])
    highs = np.log(SCH.betas[[0, 1, 50, 99]])
    for v, expected in [(-1.0, lows), (1.0, highs), (0.0, (lows + highs) / 2)]:
        output = jnp.concatenate([pred, jnp.full_like(pred, v)], axis=-1)
        mean, var, log_var, x0 = diffusion.p_mean_variance(
            SCH, output, x_t, t, prediction=prediction, variance="learned_range"
        )
        want = np.broadcast_to(expected.astype(np.float32)[:, None, None, None], x_t.shape)
        if v == 0.0:  # the geometric mean of the two variances
            np.testing.assert_allclose(log_var, want, rtol=1e-6)
        else:
            np.testing.assert_array_equal(log_var, want)
        np.testing.assert_allclose(var, np.exp(want), rtol=1e-6)
        # The mean does not depend on the variance channels: it is the fixed-variance one.
        fixed_mean, _, _, fixed_x0 = diffusion.p_mean_variance(
            SCH, pred, x_t, t, prediction=prediction, variance="fixed_small"
        )
        np.testing.assert_array_equal(mean, fixed_mean)
        np.testing.assert_array_equal(x0, fixed_x0)


@pytest.mark.parametrize(
    "num_steps, spacing", [(100, "linspace"), (7, "quadratic"), (1, "linspace")]
)
def test_respaced_learned_range_bounds_equal_those_of_the_respaced_schedule(
    num_steps, spacing
) -> None:
    ts = samplers.get_timesteps(100, num_steps, spacing)
    ab = SCH.alphas_cumprod[ts]
    min_log, max_log = samplers.ddpm.learned_range_bounds(ab)
    # Improved DDPM's respacing: a schedule whose alphas_cumprod are ab at the kept timesteps.
    ab_asc = ab[::-1]
    betas = 1.0 - ab_asc / np.append(1.0, ab_asc[:-1])
    respaced = schedules.schedule_from_betas(betas)
    np.testing.assert_allclose(min_log, respaced.posterior_log_variance_clipped[::-1], rtol=1e-10)
    np.testing.assert_allclose(max_log, np.log(respaced.betas[::-1]), rtol=1e-10)
    if num_steps == 100:  # the full chain is the schedule itself
        np.testing.assert_allclose(min_log, SCH.posterior_log_variance_clipped[::-1], rtol=1e-10)


def _affine_model(learn_sigma: bool):
    """A fixed eps model (and variance values) with a known output."""

    def fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        eps = 0.7 * x_t - 0.001 * t.astype(jnp.float32)[:, None, None, None]
        if not learn_sigma:
            return eps
        return jnp.concatenate([eps, jnp.tanh(x_t + 0.3)], axis=-1)

    return fn


def _fold_in_noise(rng: jax.Array, shape: tuple[int, ...], index: int) -> jax.Array:
    keys = [jax.random.fold_in(jax.random.fold_in(rng, i), index) for i in range(shape[0])]
    return jnp.stack([jax.random.normal(k, shape[1:]) for k in keys])


def test_ddpm_learned_range_with_all_steps_equals_the_ancestral_loop() -> None:
    sch = schedules.get_schedule("cosine", 12)
    model, shape, rng = _affine_model(True), (3, 2, 2, 1), jax.random.key(4)
    out = samplers.sample(
        model,
        sch,
        shape,
        rng,
        sampler="ddpm",
        num_steps=12,
        variance="learned_range",
        learn_sigma=True,
    )
    x = _fold_in_noise(rng, shape, 0)
    for k, t in enumerate(range(11, -1, -1)):
        tt = jnp.full((3,), t, jnp.int32)
        mean, _, log_var, _ = diffusion.p_mean_variance(
            sch, model(x, tt), x, tt, variance="learned_range", clip_x0=True
        )
        x = mean + (t > 0) * jnp.exp(0.5 * log_var) * _fold_in_noise(rng, shape, k + 1)
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "sampler, variance",
    [
        ("ddim", "fixed_small"),
        ("dpm_solver++", "fixed_small"),
        ("heun", "fixed_small"),
        ("ddpm", "fixed_large"),
    ],
)
def test_samplers_use_only_the_first_channels_of_a_learn_sigma_model(sampler, variance) -> None:
    kwargs = dict(sampler=sampler, num_steps=5, variance=variance)
    shape, rng = (2, 2, 2, 1), jax.random.key(5)
    plain = samplers.sample(_affine_model(False), SCH, shape, rng, **kwargs)
    learned = samplers.sample(_affine_model(True), SCH, shape, rng, learn_sigma=True, **kwargs)
    np.testing.assert_array_equal(learned, plain)


def test_sampler_refuses_learned_range_without_learn_sigma_and_a_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match=r"variance='learned_range' needs .*learn_sigma=True"):
        samplers.sample(
            _affine_model(False),
            SCH,
            (2, 2, 2, 1),
            jax.random.key(0),
            sampler="ddpm",
            variance="learned_range",
        )
    with pytest.raises(ValueError, match=r"returned shape \(2, 2, 2, 2\).*learn_sigma=True"):
        samplers.sample(_affine_model(True), SCH, (2, 2, 2, 1), jax.random.key(0), num_steps=3)


def _loss_terms(vlb_weight: float):
    """Per-example hybrid loss as a function of the raw model output (B, 4, 4, 2C)."""
    x0 = jax.random.uniform(jax.random.key(0), (4, 4, 4, 1), minval=-1, maxval=1)
    t = jnp.array([0, 1, 40, 99])
    noise = jax.random.normal(jax.random.key(1), x0.shape)

    def loss(output: jax.Array, learn_sigma: bool = True) -> jax.Array:
        return diffusion.training_loss(
            lambda x_t, tt: output,
            SCH,
            x0,
            jax.random.key(2),
            t=t,
            noise=noise,
            learn_sigma=learn_sigma,
            vlb_weight=vlb_weight,
        )

    output = jax.random.normal(jax.random.key(3), (4, 4, 4, 2)) * 0.5
    return loss, output, x0, t, noise


def test_hybrid_loss_is_l_simple_plus_weighted_t_times_vlb_term() -> None:
    loss, output, x0, t, noise = _loss_terms(0.001)
    simple = _loss_terms(0.0)[0]
    l_simple = loss(output[..., :1], learn_sigma=False)
    np.testing.assert_array_equal(simple(output), l_simple)  # vlb_weight = 0: L_simple exactly
    x_t = diffusion.q_sample(SCH, x0, t, noise)
    vlb = diffusion.vlb_terms(SCH, output, x0, x_t, t, variance="learned_range", clip_x0=False)
    np.testing.assert_allclose(loss(output), l_simple + 0.001 * 100 * vlb, rtol=1e-6)
    assert np.all(np.asarray(vlb) > 0)


def test_vlb_part_of_the_hybrid_loss_gives_no_gradient_to_the_mean_channels() -> None:
    loss, output, *_ = _loss_terms(0.5)
    simple = _loss_terms(0.0)[0]
    grad_hybrid = jax.grad(lambda o: loss(o).sum())(output)
    grad_simple = jax.grad(lambda o: simple(o).sum())(output)
    np.testing.assert_array_equal(grad_hybrid[..., :1], grad_simple[..., :1])
    assert np.all(np.asarray(grad_simple[..., 1:]) == 0.0)
    assert np.all(np.abs(np.asarray(grad_hybrid[..., 1:])) > 0.0)  # the variance does learn


def test_config_refuses_learned_range_without_learn_sigma_and_negative_vlb_weight(
    tiny_config,
) -> None:
    tiny_config.sampling.variance = "learned_range"
    with pytest.raises(ConfigError, match=r"learned_range.*model.learn_sigma=True"):
        validate_config(tiny_config, num_devices=1)
    tiny_config.model.learn_sigma = True
    validate_config(tiny_config, num_devices=1)
    tiny_config.diffusion.vlb_weight = -0.1
    with pytest.raises(ConfigError, match=r"diffusion.vlb_weight=-0.1; use >= 0"):
        validate_config(tiny_config, num_devices=1)


@pytest.mark.slow
def test_learn_sigma_model_trains_on_digits_and_samples_with_ddpm_and_ddim(
    shared_learn_sigma_run,
) -> None:
    workdir, config, state = shared_learn_sigma_run  # the tiny config with learn_sigma=True
    assert config.model.learn_sigma
    assert int(state.step) == 6 and int(state.nonfinite_steps) == 0
    with open(f"{workdir}/metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    loaded = loading.load_run(workdir)
    assert loaded.setup.model.learn_sigma
    ddpm = loaded.sample(4, sampler="ddpm", num_steps=10, variance="learned_range")
    ddim = loaded.sample(4, sampler="ddim", num_steps=10)
    for x in (ddpm, ddim):
        assert x.shape == (4, 8, 8, 1) and np.all(np.isfinite(x)) and np.all(np.abs(x) <= 1.0)
    assert not np.allclose(ddpm, ddim)
