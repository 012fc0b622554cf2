"""Train state, optimizer schedule, EMA and the train step on real digits batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import parallel, train_state
from diffusion_jax.data import pipeline
from diffusion_jax.runner.setup import ModelSetup


def _setup(config):
    """The initial state and the jitted train step, as the training loop builds them (the step
    donates the state it is given: keep a host copy of a state to look at it afterwards)."""
    setup = ModelSetup(config)
    state = setup.init_state(jax.random.PRNGKey(0))
    train_step = setup.train_step()
    return state, lambda state, batch: train_step(state, parallel.global_batch(batch, setup.mesh))


def _digits_batch(config, batch_size=16):
    iterator = pipeline.train_iterator(config.data, seed=0, global_batch_size=batch_size)
    return next(iterator)


@pytest.mark.slow
def test_ema_without_warmup_starts_as_a_copy_of_params_and_tracks_them_with_the_decay(
    tiny_config,
):
    tiny_config.training.ema_warmup = "none"
    state, train_step = _setup(tiny_config)
    state = jax.device_get(state)  # the step donates its input
    for p, e in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params), strict=True):
        np.testing.assert_array_equal(p, e)

    decay = tiny_config.training.ema_decay
    new_state, _ = train_step(state, _digits_batch(tiny_config))
    expected = jax.tree.map(
        lambda e, p: decay * e + (1 - decay) * p, state.ema_params, new_state.params
    )
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(new_state.ema_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(new_state.step) == 1


@pytest.mark.slow
def test_debiased_ema_is_the_normalised_decay_weighted_mean_of_the_parameters_seen(tiny_config):
    tiny_config.training.ema_warmup = "debias"
    tiny_config.training.ema_decay = 0.9
    state, train_step = _setup(tiny_config)
    batch = _digits_batch(tiny_config)
    seen = []
    for _ in range(3):
        state, _ = train_step(state, batch)
        host = jax.device_get(state)
        seen.append(host.params)
        if len(seen) == 1:  # the initial parameters are forgotten at the first update
            for p, e in zip(
                jax.tree.leaves(host.params), jax.tree.leaves(host.ema_params), strict=True
            ):
                np.testing.assert_array_equal(p, e)
    # After n updates: sum_k d^(n-k) p_k / sum_k d^(n-k).
    weights = np.array([0.81, 0.9, 1.0])
    expected = jax.tree.map(
        lambda *ps: (
            sum(w * np.asarray(p, np.float64) for w, p in zip(weights, ps, strict=True))
            / weights.sum()
        ),
        *seen,
    )
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(host.ema_params), strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-6, atol=1e-7)


def test_ema_decay_schedules_match_their_closed_forms():
    steps = jnp.arange(6)
    decay = 0.998
    np.testing.assert_allclose(
        train_state.ema_decay_at(steps, decay, "ramp"),
        np.minimum(decay, (1 + np.arange(6)) / (10 + np.arange(6))),
        rtol=1e-6,
    )
    n = np.arange(1, 7, dtype=np.float64)
    np.testing.assert_allclose(
        train_state.ema_decay_at(steps, decay, "debias"),
        (decay - decay**n) / (1 - decay**n),
        rtol=2e-4,  # decay - decay^n cancels in float32 at small n
    )
    assert float(train_state.ema_decay_at(jnp.asarray(0), decay, "debias")) == 0.0
    assert float(train_state.ema_decay_at(jnp.asarray(10**6), decay, "debias")) == np.float32(decay)
    assert float(train_state.ema_decay_at(jnp.asarray(3), decay, "none")) == np.float32(decay)


def test_learning_rate_warms_up_linearly_then_stays_constant(tiny_config):
    tiny_config.training.learning_rate = 1e-3
    tiny_config.training.warmup_steps = 10
    tiny_config.training.grad_clip = 0.0
    optimizer = train_state.create_optimizer(tiny_config.training)
    params = {"w": jnp.ones(())}
    opt_state = optimizer.init(params)
    # Adam's first update has magnitude lr (sign of the gradient), so it reveals the rate.
    sizes = []
    for _ in range(12):
        updates, opt_state = optimizer.update({"w": jnp.ones(())}, opt_state, params)
        sizes.append(-float(updates["w"]))
    np.testing.assert_allclose(sizes[:3], [0.0, 1e-4, 2e-4], atol=1e-9)
    np.testing.assert_allclose(sizes[10:], [1e-3, 1e-3], rtol=1e-5)


def test_training_on_one_digits_batch_reduces_the_loss(tiny_config):
    # The tiny config's own step (learning rate 1e-3, 2 warmup steps, batch 16): the program
    # the training runs compile, so it comes from the compilation cache.
    state, train_step = _setup(tiny_config)
    batch = _digits_batch(tiny_config)
    losses = []
    for _ in range(30):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_same_seed_and_batch_give_bitwise_identical_steps(tiny_config):
    batch = _digits_batch(tiny_config)
    results = []
    for _ in range(2):
        state, train_step = _setup(tiny_config)
        state, metrics = train_step(state, batch)
        results.append((float(metrics["loss"]), jax.tree.leaves(state.params)))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_nonfinite_batch_skips_the_update_but_advances_the_step_and_counts_it(tiny_config):
    state, train_step = _setup(tiny_config)
    batch = _digits_batch(tiny_config)
    poisoned = {**batch, "image": np.full_like(batch["image"], np.nan)}
    initial = jax.device_get(state)  # the step donates its input

    skipped, metrics = train_step(state, poisoned)
    assert int(skipped.step) == 1 and int(metrics["nonfinite"]) == 1
    assert int(skipped.nonfinite_steps) == 1 and int(skipped.consecutive_nonfinite) == 1
    for name in ("params", "opt_state", "ema_params"):
        before, after = (
            jax.tree.leaves(getattr(initial, name)),
            jax.tree.leaves(getattr(skipped, name)),
        )
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)

    recovered, metrics = train_step(skipped, batch)
    assert int(metrics["nonfinite"]) == 0 and np.isfinite(float(metrics["loss"]))
    assert int(recovered.nonfinite_steps) == 1 and int(recovered.consecutive_nonfinite) == 0


def test_optimizer_state_has_one_structure_with_and_without_clipping(tiny_config):
    """So a run can resume after training.grad_clip is switched on or off."""
    params = {"w": jnp.ones((3,))}
    structures = []
    for clip in (0.0, 1.0):
        tiny_config.training.grad_clip = clip
        opt_state = train_state.create_optimizer(tiny_config.training).init(params)
        structures.append(jax.tree.structure(opt_state))
    assert structures[0] == structures[1]
