"""A trained run loaded from its workdir: config, model, schedule and EMA parameters.

What the editing and visualisation modes and the notebook API (`diffusion_jax.analysis`) start
from; the sample and eval modes, which shard their sampling over devices, use its parts
(`setup.ModelSetup` and its `restore`) directly.

    run = load_run("workdirs/digits")            # config.json + latest readable checkpoint
    x = run.sample(num_samples=16, sampler="ddim", num_steps=50)   # float32 (16, H, W, C)
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import jax
import ml_collections
import numpy as np

from diffusion_jax import checkpointing, diffusion, samplers, schedules, train_state
from diffusion_jax.data_gaussian import DataGaussian
from diffusion_jax.runner import workdir as workdir_lib
from diffusion_jax.runner.setup import ModelSetup

PyTree = Any


@dataclasses.dataclass
class Run:
    """A trained run: its workdir, saved config, setup and the restored train state."""

    workdir: str
    config: ml_collections.ConfigDict
    setup: ModelSetup
    state: train_state.TrainState

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
        return self.setup.num_classes

    def sampler_spec(self) -> samplers.SamplerSpec:
        """The sampler options of the run's `config.sampling`, for this model."""
        return self.setup.sampler_spec()

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

        sampler_kwargs replace fields of the run's `sampler_spec()` (sampler, num_steps, eta,
        guidance_scale, ...; see `samplers.SamplerSpec`); other keywords go to `samplers.sample`
        (x_init, start_timestep, ...). Sample i uses fold_in(seed key, i),
        as in the sample and eval modes.
        """
        fields = {f.name for f in dataclasses.fields(samplers.SamplerSpec)}
        spec = self.sampler_spec().replace(
            **{k: v for k, v in sampler_kwargs.items() if k in fields}
        )
        inputs = {k: v for k, v in sampler_kwargs.items() if k not in fields}
        shape = (num_samples, *self.setup.image_shape)
        model_fn = self.model_fn()
        gaussian = None
        if spec.gaussian_start_t:
            gaussian = self.setup.data_gaussian(self.workdir).as_arrays(diffusion.float_dtype())

        @jax.jit
        def generate(
            rng: jax.Array, labels: jax.Array | None, gaussian: DataGaussian | None
        ) -> jax.Array:
            return cast(
                jax.Array,
                spec.sample(
                    model_fn,
                    self.schedule,
                    shape,
                    rng,
                    labels=labels,
                    data_gaussian=gaussian,
                    **inputs,
                ),
            )

        label_array = None if labels is None else np.asarray(labels, np.int32)
        return np.asarray(generate(jax.random.PRNGKey(seed), label_array, gaussian))


def load_run(
    workdir: str,
    *,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
) -> Run:
    """Load `workdir`'s run: its saved config (or `config`) and the checkpoint at `step`
    (default: the latest readable one). The dataset must be prepared (for its shape and
    classes): `errors.DatasetNotPreparedError` names the command otherwise."""
    checkpointing.require_checkpoint(workdir)
    if config is None:
        config = workdir_lib.read_config(workdir)
        if "parallel" in config:
            # The saved device split is the training machine's; here the state is read onto
            # this process's devices, replicated (any checkpoint restores onto any mesh).
            config.parallel.fsdp = 1
    setup = ModelSetup(config)
    return Run(workdir=workdir, config=config, setup=setup, state=setup.restore(workdir, step))
