"""The training and sampling programs behind `experiments/main.py`, as library functions.

`train(config, workdir)` resumes from the latest checkpoint in `workdir` when there is one, so
rerunning the same command continues a run. `sample(config, workdir)` writes
`samples/<name>.npz` (uint8 NHWC under 'images') and a PNG grid from the EMA parameters.
Progress goes through `absl.logging`; nothing is printed.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import checkpointing, images, parallel, sampling, schedules, training
from diffusion_jax.config_validation import validate_config
from diffusion_jax.data import pipeline
from diffusion_jax.metric_writer import MetricWriter


def _is_chief() -> bool:
    return jax.process_index() == 0


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Save the resolved config as `<workdir>/config.json` (process 0 only)."""
    if _is_chief():
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


class _Setup:
    """What both modes derive from a config: mesh, data info, model, schedule, state shape."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.mesh = parallel.create_mesh()
        self.info = pipeline.dataset_info(config.data)
        self.image_shape: tuple[int, int, int] = tuple(self.info.image_shape)  # type: ignore[assignment]
        self.model = training.create_model(config.model, self.info.num_classes)
        self.schedule = schedules.get_schedule(
            config.diffusion.schedule, num_timesteps=config.diffusion.num_timesteps
        )
        self.optimizer = training.create_optimizer(config.training)
        self.replicated = parallel.replicated_sharding(self.mesh)
        self.init_state = jax.jit(
            functools.partial(
                training.init_train_state,
                self.model,
                self.optimizer,
                image_shape=self.image_shape,
            ),
            out_shardings=self.replicated,
        )
        self.abstract_state = checkpointing.abstract_like(
            jax.eval_shape(self.init_state, jax.random.PRNGKey(0)), self.replicated
        )

    def sample_fn(self, config: ml_collections.ConfigDict, batch_size: int) -> Any:
        return sampling.make_sample_fn(
            self.model,
            self.schedule,
            config.sampling,
            config.diffusion.prediction,
            self.image_shape,
            batch_size,
            self.mesh,
        )

    def labels_fn(self, config: ml_collections.ConfigDict) -> Any:
        if not config.model.class_conditional:
            return None
        return functools.partial(
            sampling.sample_labels,
            sampling_config=config.sampling,
            num_classes=self.info.num_classes or 1,
        )


def train(config: ml_collections.ConfigDict, workdir: str) -> training.TrainState:
    """Train (or resume) until `config.training.num_train_steps`; returns the final state."""
    validate_config(config, num_devices=jax.device_count())
    setup = _Setup(config)
    tcfg = config.training
    write_config(config, workdir)
    data_iter = pipeline.train_iterator(
        config.data,
        seed=config.seed,
        global_batch_size=tcfg.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    checkpointer = checkpointing.Checkpointer(workdir, max_to_keep=tcfg.max_checkpoints_to_keep)
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(setup.abstract_state, data_iter)
        logging.info("Resumed from step %d in %s", int(state.step), workdir)
    else:
        state = setup.init_state(jax.random.PRNGKey(config.seed))
        logging.info("Starting a new run in %s", workdir)

    train_step = jax.jit(
        training.make_train_step(
            setup.model, setup.schedule, setup.optimizer, config.diffusion, tcfg.ema_decay
        ),
        in_shardings=(setup.replicated, parallel.batch_sharding(setup.mesh)),
        out_shardings=(setup.replicated, setup.replicated),
        donate_argnums=0,
    )
    writer = MetricWriter(workdir, enabled=_is_chief())
    grid_fn = setup.sample_fn(config, _grid_batch_size(tcfg.num_grid_samples, setup.mesh))
    step = int(state.step)
    window_start, window_steps = time.perf_counter(), 0
    while step < tcfg.num_train_steps:
        batch = parallel.global_batch(next(data_iter), setup.mesh)
        state, metrics = train_step(state, batch)
        step += 1
        window_steps += 1
        if step % tcfg.log_every == 0 or step == tcfg.num_train_steps:
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - window_start
            scalars["steps_per_sec"] = window_steps / elapsed
            scalars["images_per_sec"] = scalars["steps_per_sec"] * tcfg.batch_size
            writer.write(step, scalars)
            eta = (tcfg.num_train_steps - step) / scalars["steps_per_sec"]
            logging.info(
                "step %d/%d  loss %.4f  %.2f steps/s  ETA %s",
                step,
                tcfg.num_train_steps,
                scalars["loss"],
                scalars["steps_per_sec"],
                _format_seconds(eta),
            )
            window_start, window_steps = time.perf_counter(), 0
        if step % tcfg.checkpoint_every == 0 or step == tcfg.num_train_steps:
            checkpointer.save(step, state, data_iter)
        if (tcfg.sample_every and step % tcfg.sample_every == 0) or step == tcfg.num_train_steps:
            _write_training_grid(setup, config, grid_fn, state, workdir, step)
    checkpointer.wait_until_finished()
    checkpointer.close()
    writer.close()
    return state


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Write `<workdir>/samples/<name>.npz` and `.png` from the latest checkpoint's EMA params.

    Returns the path of the .npz file.
    """
    scfg = config.sampling
    validate_config(config, num_devices=jax.device_count())
    checkpointing.require_checkpoint(workdir)
    setup = _Setup(config)
    checkpointer = checkpointing.Checkpointer(workdir, async_save=False)
    state = checkpointer.restore(setup.abstract_state)
    checkpointer.close()
    batches = sampling.generate_batches(
        setup.sample_fn(config, scfg.batch_size),
        state.ema_params,
        seed=scfg.seed,
        num_samples=scfg.num_samples,
        batch_size=scfg.batch_size,
        labels_fn=setup.labels_fn(config),
    )
    started = time.perf_counter()
    samples = np.concatenate(list(batches))
    logging.info(
        "Sampled %d images (%s, %d steps) in %.1f s",
        len(samples),
        scfg.sampler,
        scfg.num_steps,
        time.perf_counter() - started,
    )
    path = os.path.join(workdir, "samples", sampling.sample_name(scfg) + ".npz")
    if _is_chief():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _atomic_savez(path, samples)
        images.save_grid(path[: -len(".npz")] + ".png", samples[: min(len(samples), 100)])
        with open(path[: -len(".npz")] + ".json", "w") as f:
            json.dump({"step": int(state.step), "sampling": scfg.to_dict()}, f, indent=2)
    return path


def _write_training_grid(
    setup: _Setup,
    config: ml_collections.ConfigDict,
    grid_fn: Any,
    state: training.TrainState,
    workdir: str,
    step: int,
) -> None:
    num = config.training.num_grid_samples
    batches = sampling.generate_batches(
        grid_fn,
        state.ema_params,
        seed=config.sampling.seed,
        num_samples=num,
        batch_size=_grid_batch_size(num, setup.mesh),
        labels_fn=setup.labels_fn(config),
    )
    grid = np.concatenate(list(batches))
    if _is_chief():
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        images.save_grid(os.path.join(workdir, "samples", f"train_step{step}.png"), grid)


def _grid_batch_size(num_samples: int, mesh: jax.sharding.Mesh) -> int:
    """Smallest multiple of the device count that holds `num_samples`."""
    devices = mesh.devices.size
    return -(-num_samples // devices) * devices


def _atomic_savez(path: str, samples: np.ndarray) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=samples)
    os.replace(tmp, path)


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
