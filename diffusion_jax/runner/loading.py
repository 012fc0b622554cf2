"""A trained run loaded from its workdir: config, model, schedule and EMA parameters.

What the editing and visualisation modes and the notebook API (`diffusion_jax.analysis`) start
from; the sample and eval modes, which shard their sampling over devices, use its parts
(`setup.ModelSetup` and its `restore`) directly.

    run = load_run("workdirs/digits")            # config.json + latest readable checkpoint
    x = run.sample(num_samples=16, sampler="ddim", num_steps=50)   # float32 (16, H, W, C)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, cast

import jax
import ml_collections
import numpy as np

from diffusion_jax import (
    checkpointing,
    diffusion,
    formulations,
    samplers,
    schedules,
    train_state,
)
from diffusion_jax.data_gaussian import DataGaussian
from diffusion_jax.errors import ConfigError
from diffusion_jax.runner import ema_snapshots, xla_options
from diffusion_jax.runner import generate as generate_lib
from diffusion_jax.runner import guide as guide_lib
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
    # A post-hoc EMA reconstruction to sample instead of the EMA (`load_run(params=...)`).
    sampling_params: PyTree | None = None
    # Run.sample's jitted samplers, one per (spec, shape, non-array inputs): a notebook cell
    # that samples again with the same options reuses the compiled program.
    _samplers: dict[Any, Any] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # Run.sample's guides loaded from `sampling.guide` sources, by source.
    _guides: dict[str, guide_lib.Guide] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def step(self) -> int:
        return int(self.state.step)

    @property
    def params(self) -> PyTree:
        """The parameters every sampling method uses: the EMA, or the post-hoc EMA
        reconstruction `load_run(params='posthoc_ema:<sigma_rel>')` loaded."""
        if self.sampling_params is not None:
            return self.sampling_params
        return self.state.ema_params

    @property
    def schedule(self) -> schedules.Schedule:
        return self.setup.schedule

    @property
    def formulation(self) -> formulations.Formulation:
        return self.setup.formulation

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
        guide: Run | str | None = None,
        **sampler_kwargs: Any,
    ) -> np.ndarray:
        """float32 (num_samples, H, W, C) samples in [-1, 1] on one device (for notebooks).

        sampler_kwargs replace fields of the run's `sampler_spec()` (sampler, num_steps, eta,
        guidance_scale, guidance_interval, ...; see `samplers.SamplerSpec`); other keywords go
        to `samplers.sample` (x_init, start_timestep, ...). guide: autoguidance's guide, another
        loaded `Run` (e.g. `load_run(workdir, step=1000)`) or a `sampling.guide` source
        ('step:1000', 'posthoc_ema:0.05', 'workdir:<path>'; default: the run's
        `sampling.guide`); it applies where guidance_scale != 1. Sample i uses fold_in(seed
        key, i), as in the sample and eval modes. The compiled sampler is cached per option
        set (spec, num_samples, non-array keywords, guide model): calling again with the same
        options, any seed or labels, compiles nothing.
        """
        if "guide_fn" in sampler_kwargs:
            raise ValueError(
                "pass the guide as guide= (a loaded Run or a source such as 'step:1000')"
            )
        names = samplers.choice_names()
        spec = self.sampler_spec().choose(**{k: v for k, v in sampler_kwargs.items() if k in names})
        inputs = {k: v for k, v in sampler_kwargs.items() if k not in names}
        if "start_timestep" in inputs:
            inputs["start_sigma"] = samplers.start_timestep_sigma(
                self.formulation, inputs.pop("start_timestep"), spec.num_steps
            )
        arrays = {k: v for k, v in inputs.items() if isinstance(v, np.ndarray | jax.Array)}
        static = tuple(sorted((k, v) for k, v in inputs.items() if k not in arrays))
        shape = (num_samples, *self.setup.image_shape)
        gaussian = None
        if spec.start_sigma(self.formulation) is not None:
            gaussian = self.setup.data_gaussian(self.workdir).as_arrays(diffusion.float_dtype())
        if guide is None:  # the run's own sampling.guide, as its sample and eval modes use
            guide = str(self.config.sampling.get("guide", "")) or None
        loaded = self.guide(guide) if guide is not None and spec.guided else None
        guide_model = None if loaded is None else loaded.model
        key = (spec, shape, static, guide_model)  # modules compare by their hyperparameters
        generate = self._samplers.get(key)
        if generate is None:
            generate = self._samplers[key] = self._jit_sampler(
                spec, shape, dict(static), guide_model
            )
        label_array = None if labels is None else np.asarray(labels, np.int32)
        guide_params = None if loaded is None else loaded.params
        rng = jax.random.PRNGKey(seed)
        return np.asarray(generate(self.params, guide_params, rng, label_array, gaussian, arrays))

    def guide(self, guide: Run | str) -> guide_lib.Guide:
        """Autoguidance's guide for this run: another loaded run of the same data and
        formulation, or a `sampling.guide` source resolved in this run's workdir (loaded once
        per source)."""
        if isinstance(guide, str):
            if guide not in self._guides:
                source = guide_lib.parse(guide)
                if source is None:
                    raise ConfigError("guide='' names no guide; pass a source or a loaded Run")
                self._guides[guide] = guide_lib.load_source(source, self.setup, self.workdir)
            return self._guides[guide]
        guide_lib.check_compatible(self.config, guide.config, guide.workdir)
        source = guide_lib.Source(workdir=guide.workdir, step=guide.step)
        return guide_lib.Guide(guide.setup.model, guide.params, guide.step, source)

    def _jit_sampler(
        self,
        spec: samplers.SamplerSpec,
        shape: tuple[int, ...],
        static: dict[str, Any],
        guide_model: Any = None,
    ) -> Any:
        """The jitted sampler of one option set; parameters (the guide's too), key, labels,
        data Gaussian and array inputs (x_init, sample_ids, ...) are its arguments, so new
        values of the same shapes reuse the compiled program (jit retraces by itself for new
        shapes)."""
        setup = self.setup

        @functools.partial(jax.jit, compiler_options=xla_options.compiler_options(setup.config))
        def generate(
            params: PyTree,
            guide_params: PyTree,
            rng: jax.Array,
            labels: jax.Array | None,
            gaussian: DataGaussian | None,
            arrays: dict[str, jax.Array],
        ) -> jax.Array:
            guide_fn = None
            if guide_model is not None:
                guide_fn = generate_lib.network(guide_model, guide_params)
            return cast(
                jax.Array,
                spec.sample(
                    setup.model_fn(params),
                    setup.formulation,
                    shape,
                    rng,
                    labels=labels,
                    guide_fn=guide_fn,
                    data_gaussian=gaussian,
                    **arrays,
                    **static,
                ),
            )

        return generate


def load_run(
    workdir: str,
    *,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    params: str = "ema",
) -> Run:
    """Load `workdir`'s run: its saved config (or `config`) and the checkpoint at `step`
    (default: the latest readable one). The dataset must be prepared (for its shape and
    classes): `errors.DatasetNotPreparedError` names the command otherwise.

    params: 'ema', or 'posthoc_ema:<sigma_rel>' to sample a reconstruction written by
    `--mode=posthoc_ema` (as `sampling.params`; docs/posthoc_ema.md).
    """
    checkpointing.require_checkpoint(workdir)
    ema_snapshots.require_params(workdir, params)
    if config is None:
        config = workdir_lib.read_config(workdir)
        if "parallel" in config:
            # The saved device split is the training machine's; here the state is read onto
            # this process's devices, replicated (any checkpoint restores onto any mesh).
            config.parallel.fsdp = 1
    setup = ModelSetup(config)
    state = setup.restore(workdir, step)
    sampling_params = None
    if (sigma_rel := ema_snapshots.parse_params(params)) is not None:
        sampling_params, _ = ema_snapshots.read_params(
            workdir, sigma_rel, setup.abstract_state.ema_params
        )
    return Run(
        workdir=workdir, config=config, setup=setup, state=state, sampling_params=sampling_params
    )
