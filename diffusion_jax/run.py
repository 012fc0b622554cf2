"""A trained run loaded from its workdir: config, model, schedule and EMA parameters.

The one place that turns a workdir into something to sample from; the sample, eval and editing
modes and the notebook API (`diffusion_jax.analysis`) all start here.

    run = load_run("workdirs/digits")            # config.json + latest readable checkpoint
    x = run.sample(num_samples=16, sampler="ddim", num_steps=50)   # float32 (16, H, W, C)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, cast

import jax
import ml_collections
import numpy as np

from diffusion_jax import checkpointing, parallel, samplers, schedules, training
from diffusion_jax.config_validation import ConfigError, validate_against_dataset
from diffusion_jax.data import pipeline
from diffusion_jax.models.unet import UNet

PyTree = Any


def read_saved_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved as `<workdir>/config.json`.

    Raises `checkpointing.NoCheckpointError` naming the fix when the workdir has none.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise checkpointing.NoCheckpointError(
            f"{workdir} has no config.json; train there first (python -m experiments.main "
            f"--config=... --workdir={workdir}) or pass the run's workdir"
        )
    with open(path) as f:
        saved = json.load(f)
    return ml_collections.ConfigDict(_lists_to_tuples(saved))


def _lists_to_tuples(value: Any) -> Any:
    """JSON has no tuples; configs keep sequences (ch_mult, attn_resolutions) as tuples."""
    if isinstance(value, dict):
        return {k: _lists_to_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


class ModelSetup:
    """What a config fixes before any checkpoint is read: dataset info, model, schedule and the
    shape (with shardings) of the train state, on a mesh over all devices."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.config = config
        self.mesh = parallel.create_mesh()
        try:
            self.info = pipeline.dataset_info(config.data)
        except pipeline.DatasetNotPreparedError:
            raise
        except ValueError as error:  # e.g. an unknown dataset name
            raise ConfigError(f"data.name={config.data.name!r}: {error}") from None
        validate_against_dataset(config, self.info.num_classes)
        self.image_shape: tuple[int, int, int] = tuple(self.info.image_shape)  # type: ignore[assignment]
        self.model: UNet = training.create_model(config.model, self.info.num_classes)
        self.schedule = schedules.get_schedule(
            config.diffusion.schedule, num_timesteps=config.diffusion.num_timesteps
        )
        self.optimizer = training.create_optimizer(config.training)
        self.replicated = parallel.replicated_sharding(self.mesh)
        self.init_state = jax.jit(
            lambda rng: training.init_train_state(
                self.model, self.optimizer, rng, image_shape=self.image_shape
            ),
            out_shardings=self.replicated,
        )
        self.abstract_state = checkpointing.abstract_like(
            jax.eval_shape(self.init_state, jax.random.PRNGKey(0)), self.replicated
        )

    def restore(self, workdir: str, step: int | None = None) -> training.TrainState:
        """The train state at `step` (default: the latest readable checkpoint), read-only.

        Raises `checkpointing.NoCheckpointError` when there is none (or no such step).
        """
        checkpointing.require_checkpoint(workdir)
        # Read-only: a manager that may write would delete the tmp dir of a save in flight
        # when reading from a workdir that is still training.
        checkpointer = checkpointing.Checkpointer(workdir, async_save=False, read_only=True)
        try:
            if step is None:
                state = checkpointer.restore_latest_readable(self.abstract_state)
            else:
                if step not in checkpointing.finished_steps(workdir):
                    raise checkpointing.NoCheckpointError(
                        f"{workdir} has no checkpoint at step {step}; it has "
                        f"{checkpointing.finished_steps(workdir)}"
                    )
                state = checkpointer.restore(self.abstract_state, step=step)
        finally:
            checkpointer.close()
        if state is None:  # the checkpoints vanished since require_checkpoint
            raise checkpointing.NoCheckpointError(f"no checkpoint left in {workdir}")
        return cast(training.TrainState, state)

    def model_fn(self, params: PyTree) -> Any:
        """`fn(x_t (B, H, W, C), t (B,), labels (B,) | None = None) -> output`, eval mode."""

        def fn(x_t: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
            return cast(
                jax.Array, self.model.apply({"params": params}, x_t, t, labels, train=False)
            )

        return fn


@dataclasses.dataclass
class Run:
    """A trained run: its workdir, saved config, setup and the restored train state."""

    workdir: str
    config: ml_collections.ConfigDict
    setup: ModelSetup
    state: training.TrainState

    @property
    def step(self) -> int:
        return int(self.state.step)

    @property
    def params(self) -> PyTree:
        """The EMA parameters (what every sampling mode uses)."""
        return self.state.ema_params

    @property
    def schedule(self) -> schedules.Schedule:
        return self.setup.schedule

    @property
    def num_classes(self) -> int | None:
        return self.setup.info.num_classes if self.config.model.class_conditional else None

    def model_fn(self) -> Any:
        """The EMA model as `fn(x_t, t, labels=None)`; see `ModelSetup.model_fn`."""
        return self.setup.model_fn(self.params)

    def sample(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        labels: np.ndarray | None = None,
        **sampler_kwargs: Any,
    ) -> np.ndarray:
        """float32 (num_samples, H, W, C) samples in [-1, 1] on one device (for notebooks).

        sampler_kwargs go to `samplers.sample` (sampler, num_steps, eta, guidance_scale, ...);
        unset ones come from the run's `config.sampling`. Sample i uses fold_in(seed key, i),
        as in the sample and eval modes.
        """
        kwargs = config_sampler_kwargs(self.config, self.num_classes)
        kwargs.update(sampler_kwargs)
        shape = (num_samples, *self.setup.image_shape)
        model_fn = self.model_fn()

        @jax.jit
        def generate(rng: jax.Array, labels: jax.Array | None) -> jax.Array:
            return cast(
                jax.Array,
                samplers.sample(model_fn, self.schedule, shape, rng, labels=labels, **kwargs),
            )

        label_array = None if labels is None else np.asarray(labels, np.int32)
        return np.asarray(generate(jax.random.PRNGKey(seed), label_array))


def config_sampler_kwargs(
    config: ml_collections.ConfigDict, num_classes: int | None
) -> dict[str, Any]:
    """`samplers.sample` options from a config's `sampling` and `diffusion` sections."""
    s = config.sampling
    return {
        "sampler": s.sampler,
        "num_steps": s.num_steps,
        "eta": s.eta,
        "prediction": config.diffusion.prediction,
        "clip_x0": s.clip_x0,
        "temperature": s.temperature,
        "timestep_spacing": s.timestep_spacing,
        "variance": s.variance,
        "guidance_scale": s.guidance_scale,
        "num_classes": num_classes,
        # A learned-variance model outputs 2C channels; the samplers must know to split them.
        "learn_sigma": bool(config.model.get("learn_sigma", False)),
    }


def load_run(
    workdir: str,
    *,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
) -> Run:
    """Load `workdir`'s run: its saved config (or `config`) and the checkpoint at `step`
    (default: the latest readable one). The dataset must be prepared (for its shape and
    classes): `pipeline.DatasetNotPreparedError` names the command otherwise."""
    checkpointing.require_checkpoint(workdir)
    if config is None:
        config = read_saved_config(workdir)
    setup = ModelSetup(config)
    return Run(workdir=workdir, config=config, setup=setup, state=setup.restore(workdir, step))
