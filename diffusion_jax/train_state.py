"""Train state, optimizer, EMA and the pure, jittable training step.

Everything that determines the future of a run lives in `TrainState`, so a checkpoint of it
(plus the data iterator's position) resumes a run exactly. The per-step randomness is
`fold_in(state.rng, state.step)`: it depends only on the seed and the step, never on how many
devices or hosts share the batch (JAX's threefry is partitionable).

A step whose loss or gradients are not finite is skipped: params, optimizer state and EMA stay
as they were, while `step` still advances (the data iterator has consumed the batch, so data
position and per-step randomness stay aligned with an unbroken run). `nonfinite_steps` counts
skipped steps over the run and `consecutive_nonfinite` the current streak, which the training
loop compares with `training.max_consecutive_nonfinite`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, cast

import flax
import jax
import jax.numpy as jnp
import optax

from diffusion_jax import posthoc_ema
from diffusion_jax.errors import ConfigError
from diffusion_jax.formulations import Formulation
from diffusion_jax.models.unet import UNet

PyTree = Any
Batch = Mapping[str, jax.Array]

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# How the EMA's decay starts (`ema_decay_at`): 'ramp' is min(decay, (1 + step) / (10 + step))
# (TF's ExponentialMovingAverage num_updates), an averaging window of about step / 9 steps until
# it reaches 1 / (1 - decay); 'debias' weights the parameters seen so far by decay^age,
# normalised (optax's debiased EMA), a window of min(step, 1 / (1 - decay)); 'none' is the
# constant decay from a copy of the initial parameters, whose weight decay^step lingers (13.5% at
# step 1000 with 0.998), as in runs saved before the option existed. The default, 'ramp', won on
# the main job (digits FD at step 2000, 20 steps, seeds 0 / 1: ddpm 2.39 / 3.14 vs debias 2.56 /
# 3.53, dpm_solver++ 4.14 / 3.28 vs 5.66 / 4.10; docs/samplers.md).
EMA_WARMUPS = ("ramp", "debias", "none")


@flax.struct.dataclass
class TrainState:
    """step: int32 (); rng: uint32 (2,) base key; params/opt_state/ema_params: pytrees;
    nonfinite_steps, consecutive_nonfinite: int32 () counts of skipped (non-finite) steps;
    posthoc_emas: one power-function EMA of the params per tracked gamma (`posthoc_ema`), empty
    when post-hoc EMA is off (so the state, and its checkpoints, are those of runs saved before
    it existed)."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema_params: PyTree
    rng: jax.Array
    nonfinite_steps: jax.Array
    consecutive_nonfinite: jax.Array
    posthoc_emas: tuple[PyTree, ...] = ()


def create_model(model_config: Any, num_classes: int | None) -> UNet:
    """The U-Net a config describes; `num_classes` (the dataset's) sizes the class embedding."""
    if model_config.class_conditional and not num_classes:
        raise ConfigError(
            "model.class_conditional=True needs a labelled dataset; this one has no labels"
        )
    return UNet(
        ch=model_config.ch,
        ch_mult=tuple(model_config.ch_mult),
        num_res_blocks=model_config.num_res_blocks,
        attn_resolutions=tuple(model_config.attn_resolutions),
        dropout=model_config.dropout,
        num_classes=num_classes if model_config.class_conditional else None,
        # .get: configs saved before the key existed describe fixed-variance models.
        learn_sigma=bool(model_config.get("learn_sigma", False)),
        remat=bool(model_config.get("remat", False)),
        dtype=COMPUTE_DTYPES[model_config.dtype],
    )


def create_optimizer(training_config: Any) -> optax.GradientTransformation:
    """Adam(W), linear warmup to a constant rate, optional global-norm clipping (Ho et al.)."""
    lr = optax.join_schedules(
        [
            optax.linear_schedule(0.0, training_config.learning_rate, training_config.warmup_steps),
            optax.constant_schedule(training_config.learning_rate),
        ],
        boundaries=[training_config.warmup_steps],
    )
    adam = optax.adamw(
        lr,
        b1=training_config.adam_b1,
        b2=training_config.adam_b2,
        weight_decay=training_config.weight_decay,
    )
    # Always a chain, so the optimizer state has the same structure with or without clipping
    # and a run can be resumed after changing training.grad_clip.
    clip = training_config.grad_clip
    return optax.chain(optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(), adam)


def init_train_state(
    model: UNet,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, int, int],
    num_posthoc_emas: int = 0,
) -> TrainState:
    """Fresh state; the EMA starts as a copy of the initial parameters (never at zero; with an
    EMA warm-up the first update replaces it, `ema_decay_at`), and so do the `num_posthoc_emas`
    power-function EMAs (their first update replaces them)."""
    init_rng, state_rng = jax.random.split(rng)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    labels = jnp.zeros((1,), jnp.int32) if model.num_classes is not None else None
    params = model.init({"params": init_rng}, x, t, labels, train=False)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=params,
        rng=state_rng,
        nonfinite_steps=jnp.zeros((), jnp.int32),
        consecutive_nonfinite=jnp.zeros((), jnp.int32),
        posthoc_emas=(params,) * num_posthoc_emas,
    )


def ema_decay_at(step: jax.Array, decay: float, warmup: str) -> jax.Array:
    """The decay of the EMA update made by the step that starts at `step` (int, 0-based: the
    number of updates before it), as float32 (); see `EMA_WARMUPS`.

    'debias': (decay - decay^n) / (1 - decay^n) with n = step + 1, so the EMA after n updates
    is sum_k decay^(n-k) p_k / sum_k decay^(n-k) over the parameters p_1..p_n (optax's
    `ema(debias=True)` without its zero-initialised state): 0 at the first update.
    """
    if warmup not in EMA_WARMUPS:
        raise ConfigError(f"unknown training.ema_warmup {warmup!r}; use one of {EMA_WARMUPS}")
    d = jnp.float32(decay)
    if warmup == "none" or decay == 0.0:
        return d
    n = jnp.asarray(step, jnp.float32) + 1.0
    if warmup == "ramp":
        return jnp.minimum(d, n / (n + 9.0))
    d_n = jnp.power(d, n)
    return (d - d_n) / (1.0 - d_n)


def make_train_step(
    model: UNet,
    formulation: Formulation,
    optimizer: optax.GradientTransformation,
    label_dropout: float,
    ema_decay: float,
    ema_warmup: str = "none",
    posthoc_gammas: tuple[float, ...] = (),
    gather_params: Callable[[PyTree], PyTree] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """A pure `train_step(state, batch) -> (state, metrics)` to be jitted by the caller.

    The EMA update of the step starting at `state.step` uses `ema_decay_at(state.step,
    ema_decay, ema_warmup)`. With `posthoc_gammas` (one per `state.posthoc_emas`), the
    power-function EMAs are updated too (`posthoc_ema.update`), also on a skipped step: with the
    unchanged parameters, so they stay the exact power-function averages of the parameter
    sequence. The loss is the formulation's (`Formulation.training_loss`); a class-conditional
    model's labels are dropped to the null class with probability label_dropout (classifier-free
    guidance training). gather_params: applied to the parameters where the model uses
    them (`parallel.gather_params_fn`: under FSDP, gather them whole, so that the batch stays
    split and the parameters, not the activations, travel); None = use them as they are.

    batch: {'image': float32 (B, H, W, C) in [-1, 1], 'label': int32 (B,)}. The loss is the mean
    over the global batch, so the same batch on 1 or N devices gives the same update.
    metrics: float32 () 'loss', 'grad_norm'; int32 () 'nonfinite' (1 if this step was skipped),
    'nonfinite_steps' and 'consecutive_nonfinite' (the state's counters after the step).
    """
    conditional = model.num_classes is not None
    if conditional and not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must be in [0, 1]; got {label_dropout}")

    def loss_fn(params: PyTree, batch: Batch, rng: jax.Array) -> jax.Array:
        dropout_rng, loss_rng = jax.random.split(rng)
        if gather_params is not None:
            params = gather_params(params)

        def model_fn(x_t: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
            out = model.apply(
                {"params": params}, x_t, t, labels, train=True, rngs={"dropout": dropout_rng}
            )
            return cast(jax.Array, out)

        return jnp.mean(
            formulation.training_loss(
                model_fn,
                batch["image"],
                loss_rng,
                labels=batch["label"] if conditional else None,
                num_classes=model.num_classes,
                label_dropout=label_dropout if conditional else 0.0,
            )
        )

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, rng)
        grad_norm = optax.tree.norm(grads)
        # The norm is non-finite iff some gradient entry is (or the norm overflows): one check.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, ema_decay, ema_warmup)
        ema_params = optax.incremental_update(params, state.ema_params, 1.0 - decay)

        def keep_if_bad(new: PyTree, old: PyTree) -> PyTree:
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        bad = (~finite).astype(jnp.int32)
        consecutive = jnp.where(finite, 0, state.consecutive_nonfinite + 1)
        kept_params = keep_if_bad(params, state.params)
        if len(posthoc_gammas) != len(state.posthoc_emas):
            raise ValueError(
                f"{len(posthoc_gammas)} posthoc_gammas for {len(state.posthoc_emas)} tracked EMAs"
            )
        new_state = dataclasses.replace(
            state,
            step=state.step + 1,
            params=kept_params,
            opt_state=keep_if_bad(opt_state, state.opt_state),
            ema_params=keep_if_bad(ema_params, state.ema_params),
            nonfinite_steps=state.nonfinite_steps + bad,
            consecutive_nonfinite=consecutive.astype(jnp.int32),
            posthoc_emas=posthoc_ema.update(
                state.posthoc_emas, kept_params, state.step, posthoc_gammas
            ),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "nonfinite": bad,
            "nonfinite_steps": new_state.nonfinite_steps,
            "consecutive_nonfinite": new_state.consecutive_nonfinite,
        }
        return new_state, metrics

    return train_step
