"""What a config fixes before any checkpoint is read: dataset info, model, schedule, optimizer
and the shape (with shardings) of the train state, on a mesh over all devices (`data` x
`fsdp`, `parallel.fsdp`); and the restore of a checkpoint into it. Every mode that builds the
model starts here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, cast

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from diffusion_jax import (
    checkpointing,
    formulations,
    parallel,
    posthoc_ema,
    samplers,
    schedules,
    train_state,
)
from diffusion_jax.data import pipeline
from diffusion_jax.data_gaussian import DataGaussian
from diffusion_jax.errors import ConfigError, DatasetNotPreparedError, NoCheckpointError
from diffusion_jax.models.unet import UNet
from diffusion_jax.runner import ema_snapshots, generate, validation, xla_options
from diffusion_jax.runner import formulation as formulation_lib
from diffusion_jax.runner import guide as guide_lib
from diffusion_jax.runner import workdir as workdir_lib
from diffusion_jax.runner.validation import validate_against_dataset

PyTree = Any

# The train split's Gaussian model (`DataGaussian`), stored with the run for the samplers'
# Gaussian start.
DATA_GAUSSIAN_FILE = "data_gaussian.npz"


class ModelSetup:
    """What a config fixes before any checkpoint is read: dataset info, model, schedule and the
    shape (with shardings) of the train state, on a mesh over all devices."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.config = config
        fsdp, min_size = fsdp_settings(config)
        self.mesh = parallel.create_mesh(fsdp_size=fsdp)
        try:
            self.info = pipeline.dataset_info(config.data)
        except DatasetNotPreparedError:
            raise
        except ValueError as error:  # e.g. an unknown dataset name
            raise ConfigError(f"data.name={config.data.name!r}: {error}") from None
        validate_against_dataset(config, self.info.num_classes)
        self.image_shape: tuple[int, int, int] = tuple(self.info.image_shape)  # type: ignore[assignment]
        self.model: UNet = train_state.create_model(config.model, self.info.num_classes)
        # What the model is: its formulation (`diffusion.formulation`), which the train step's
        # loss and every sampler ask; `schedule` is the ddpm formulation's.
        self.formulation: formulations.Formulation = formulation_lib.from_config(config)
        self.schedule = schedules.from_config(config.diffusion)
        self.optimizer = train_state.create_optimizer(config.training)
        # The tracked post-hoc EMAs (training.posthoc_ema_every > 0; .get: configs saved before
        # the keys existed track none).
        tcfg = config.training
        self.posthoc_sigma_rels: tuple[float, ...] = (
            tuple(float(s) for s in tcfg.get("posthoc_ema_sigma_rels", ()))
            if tcfg.get("posthoc_ema_every", 0) > 0
            else ()
        )
        self.posthoc_gammas = tuple(
            posthoc_ema.sigma_rel_to_gamma(s) for s in self.posthoc_sigma_rels
        )
        self.replicated = parallel.replicated_sharding(self.mesh)

        def init(rng: jax.Array) -> train_state.TrainState:
            return train_state.init_train_state(
                self.model,
                self.optimizer,
                rng,
                image_shape=self.image_shape,
                num_posthoc_emas=len(self.posthoc_gammas),
            )

        shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
        # Where each array of the train state lives: replicated, or split along 'fsdp'
        # (`parallel.state_shardings`); the train step, init and restore all use it.
        self.state_sharding = parallel.state_shardings(shapes, self.mesh, min_size)
        self.init_state = jax.jit(init, out_shardings=self.state_sharding)
        self._data_gaussian: DataGaussian | None = None  # `data_gaussian`, once read or fitted
        # Restores onto this mesh whatever mesh the checkpoint was written from.
        self.abstract_state = checkpointing.abstract_like(shapes, self.state_sharding)

    def restore(self, workdir: str, step: int | None = None) -> train_state.TrainState:
        """The train state at `step` (default: the latest readable checkpoint), read-only.

        Raises `NoCheckpointError` when there is none (or no such step).
        """
        checkpointing.require_checkpoint(workdir)
        # Read-only: a manager that may write would delete the tmp dir of a save in flight
        # when reading from a workdir that is still training.
        checkpointer = checkpointing.Checkpointer(workdir, async_save=False, read_only=True)
        abstract = self._abstract_state_of(workdir)
        try:
            if step is None:
                state = checkpointer.restore_latest_readable(abstract)
            else:
                if step not in checkpointing.finished_steps(workdir):
                    raise NoCheckpointError(
                        f"{workdir} has no checkpoint at step {step}; it has "
                        f"{checkpointing.finished_steps(workdir)}"
                    )
                state = checkpointer.restore(abstract, step=step)
        finally:
            checkpointer.close()
        if state is None:  # the checkpoints vanished since require_checkpoint
            raise NoCheckpointError(f"no checkpoint left in {workdir}")
        return cast(train_state.TrainState, state)

    def _abstract_state_of(self, workdir: str) -> train_state.TrainState:
        """`abstract_state` with as many post-hoc EMAs as the run in `workdir` tracks (its saved
        config says), whatever this config's training keys say: sampling modes restore a run
        without repeating its training flags."""
        saved = workdir_lib.checkpoint_config(workdir) or workdir_lib.read_config_json(workdir)
        if saved is None:
            return self.abstract_state
        num = 0
        if validation.saved_posthoc_every(saved) > 0:
            num = len(saved["training"].get("posthoc_ema_sigma_rels", ()))
        if num == len(self.abstract_state.posthoc_emas):
            return self.abstract_state
        return dataclasses.replace(
            self.abstract_state, posthoc_emas=(self.abstract_state.ema_params,) * num
        )

    def sampling_params(self, state: train_state.TrainState, workdir: str) -> tuple[PyTree, int]:
        """(params, step) that `sampling.params` names: the state's EMA and step ('ema'), or a
        post-hoc EMA reconstruction in `workdir` and the step it was reconstructed at."""
        sigma_rel = ema_snapshots.parse_params(self.config.sampling.get("params", "ema"))
        if sigma_rel is None:
            return state.ema_params, int(state.step)
        params, step = ema_snapshots.read_params(workdir, sigma_rel, self.abstract_state.ema_params)
        return jax.device_put(params, self.replicated), step

    def model_fn(self, params: PyTree) -> Any:
        """`fn(x_t (B, H, W, C), t (B,), labels (B,) | None = None) -> output`, eval mode."""
        return generate.network(self.model, params)

    @property
    def num_classes(self) -> int | None:
        """The class count of a class-conditional model, else None."""
        return self.info.num_classes if self.config.model.class_conditional else None

    def sampler_spec(self) -> samplers.SamplerSpec:
        """The sampler options of `config.sampling`, for this model."""
        return samplers.SamplerSpec.from_config(self.config, self.num_classes)

    def train_step(self) -> Any:
        """The training loop's jitted step for this config; see `jit_train_step`."""
        return jit_train_step(
            train_state.make_train_step(
                self.model,
                self.formulation,
                self.optimizer,
                self.config.diffusion.label_dropout,
                self.config.training.ema_decay,
                self.config.training.ema_warmup,
                self.posthoc_gammas,
                gather_params=parallel.gather_params_fn(self.mesh),
            ),
            self.mesh,
            self.state_sharding,
            xla_options.compiler_options(self.config),
        )

    def sample_fn(
        self,
        batch_size: int,
        spec: samplers.SamplerSpec | None = None,
        workdir: str | None = None,
        guide: guide_lib.Guide | None = None,
    ) -> Any:
        """The jitted, mesh-sharded sampler of `generate.make_sample_fn` for batches of
        `batch_size`, with `spec` (default: `sampler_spec()`) and autoguidance's `guide`
        (`guide.load`); a Gaussian start reads the data's Gaussian model from `workdir`
        (`data_gaussian`)."""
        spec = spec or self.sampler_spec()
        return generate.make_sample_fn(
            self.model,
            self.formulation,
            spec,
            self.image_shape,
            batch_size,
            self.mesh,
            data_gaussian=(
                self.data_gaussian(workdir)
                if spec.start_sigma(self.formulation) is not None
                else None
            ),
            compiler_options=xla_options.compiler_options(self.config),
            guide=guide,
        )

    def data_gaussian(self, workdir: str | None = None) -> DataGaussian:
        """The Gaussian model of the train split (`DataGaussian`, in the [-1, 1] pixel space the
        model sees; with data.random_flip, of the split and its mirror images), as float64
        numpy: read from `<workdir>/data_gaussian.npz`, else fitted (seconds: one pass over the
        split and an eigendecomposition of its D x D covariance) and, by the chief, written
        there for the run's later samplings."""
        if self._data_gaussian is not None:
            return self._data_gaussian
        path = workdir_lib.contained_path(workdir, DATA_GAUSSIAN_FILE) if workdir else None
        if path and workdir_lib.exists(path):
            with workdir_lib.load_npz(path) as stored:
                gaussian = DataGaussian(**{k: stored[k] for k in ("mean", "eigvals", "eigvecs")})
        else:
            images, _ = pipeline.eval_images(self.config.data, self.config.data.train_split)
            if self.config.data.random_flip:
                images = np.concatenate([images, images[:, :, ::-1]])
            gaussian = DataGaussian.fit(pipeline.to_float(images))
            if path and workdir_lib.is_chief():
                workdir_lib.atomic_savez(
                    path, mean=gaussian.mean, eigvals=gaussian.eigvals, eigvecs=gaussian.eigvecs
                )
        if gaussian.dim != int(np.prod(self.image_shape)):
            raise ConfigError(
                f"{path} holds the Gaussian of {gaussian.dim}-value images; this config's are "
                f"{self.image_shape}: delete the file to refit it"
            )
        self._data_gaussian = gaussian
        return gaussian

    def labels_fn(self) -> Any:
        """ids -> int32 labels of `generate.sample_labels` for a class-conditional model, else
        None."""
        if self.num_classes is None:
            return None
        return functools.partial(
            generate.sample_labels,
            sampling_config=self.config.sampling,
            num_classes=self.num_classes,
        )


def fsdp_settings(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(parallel.fsdp, parallel.fsdp_min_size) of `config`; (1, default) for a config saved
    before the `parallel` section existed."""
    section = config.get("parallel") or {}
    return int(section.get("fsdp", 1)), int(section.get("fsdp_min_size", parallel.FSDP_MIN_SIZE))


def jit_train_step(
    step: Any, mesh: Mesh, state_sharding: Any = None, compiler_options: Any = None
) -> Any:
    """`train_state.make_train_step(...)` jitted as the training loop runs it: the state placed
    by `state_sharding` (a sharding pytree of the state, `parallel.state_shardings`; default:
    replicated on `mesh`), the batch sharded over the mesh, the old state's buffers donated,
    compiled with `compiler_options` (`xla_options.compiler_options(config)`).
    Tests and benchmarks use this too, so they measure the step that trains."""
    replicated = parallel.replicated_sharding(mesh)
    state_sharding = replicated if state_sharding is None else state_sharding
    return jax.jit(
        step,
        in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
        compiler_options=compiler_options,
    )
