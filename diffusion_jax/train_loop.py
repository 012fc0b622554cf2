"""The training and sampling programs behind `experiments/main.py`, as library functions.

`train(config, workdir)` resumes from the latest readable checkpoint in `workdir` when there is
one, so rerunning the same command continues a run, bit for bit, after any interruption:
SIGKILL, a crash or SIGTERM (which saves a checkpoint at the current step and returns).
`metrics.jsonl` is truncated on resume to the records up to the restored step, so each step
appears once. `sample(config, workdir)` writes `samples/<name>.npz` (uint8 NHWC under 'images')
and a PNG grid from the EMA parameters. Progress goes through `absl.logging`; nothing is printed.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from types import FrameType, TracebackType
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import checkpointing, images, parallel, sampling, training
from diffusion_jax.config_validation import (
    check_resume_compatible,
    check_workdir_writable,
    locked_key_changes,
    validate_config,
)
from diffusion_jax.data import pipeline
from diffusion_jax.metric_writer import MetricWriter
from diffusion_jax.run import ModelSetup


def is_chief() -> bool:
    return jax.process_index() == 0


class NonFiniteError(RuntimeError):
    """Training produced non-finite values for too many consecutive steps."""


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Save the resolved config as `<workdir>/config.json` (process 0 only), atomically."""
    if is_chief():
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "config.json")
        with open(path + ".tmp", "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
        os.replace(path + ".tmp", path)


def check_saved_config(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool
) -> None:
    """Refuse (or, when allowed, warn about) a resume that changes the model's shape or meaning."""
    path = os.path.join(workdir, "config.json")
    if not checkpointing.finished_steps(workdir) or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        logging.warning("Cannot read %s (%s); not comparing configs.", path, error)
        return
    if not allow_config_change:
        check_resume_compatible(saved, config, workdir=workdir)
    elif changes := locked_key_changes(saved, config):
        logging.warning(
            "Resuming with a changed config (--allow_config_change): %s",
            ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes),
        )


def _truncate_metrics(workdir: str, step: int) -> None:
    """Keep the `metrics.jsonl` records up to `step` (the restored one), so the steps that a
    killed run logged after its last checkpoint, and will log again, appear once. Also drops a
    line cut short by the kill."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not is_chief() or not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(json.dumps(record) + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class _SigtermFlag:
    """Within `with`, SIGTERM sets `received` instead of killing the process (main thread only:
    Python allows handlers nowhere else)."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True  # no logging here: the handler may interrupt a logging call

    def __enter__(self) -> _SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


class _Setup(ModelSetup):
    """`run.ModelSetup` plus the jitted sample functions of both modes."""

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


def train(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> training.TrainState:
    """Train (or resume) until `config.training.num_train_steps`; returns the final state.

    Before anything is compiled, refuses (`ConfigError`) an invalid config, an unwritable
    workdir, and a workdir whose checkpoints were written with different
    `config_validation.RESUME_LOCKED_KEYS` values unless `allow_config_change`. On SIGTERM it
    saves a checkpoint at the current step and returns the state early. Raises `NonFiniteError`
    after `training.max_consecutive_nonfinite` skipped steps in a row, and
    `checkpointing.CheckpointSaveError` when a save fails.
    """
    validate_config(config, num_devices=jax.device_count())
    check_workdir_writable(workdir)
    check_saved_config(config, workdir, allow_config_change)
    setup = _Setup(config)
    checkpointer = checkpointing.Checkpointer(
        workdir, max_to_keep=config.training.max_checkpoints_to_keep
    )
    # The handler stays until the last save is on disk: a second SIGTERM must not cut it short.
    with _SigtermFlag() as sigterm:
        try:
            state = _train(config, workdir, setup, checkpointer, sigterm)
        except BaseException:
            _close_after_error(checkpointer)
            raise
        checkpointer.wait_until_finished()
        checkpointer.close()
    return state


def _close_after_error(checkpointer: checkpointing.Checkpointer) -> None:
    """Let an in-flight save finish (it is a valid checkpoint) without masking the error."""
    try:
        checkpointer.wait_until_finished()
        checkpointer.close()
    except Exception as error:
        logging.warning("Closing the checkpointer after an error failed too: %s", error)


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    setup: _Setup,
    checkpointer: checkpointing.Checkpointer,
    sigterm: _SigtermFlag,
) -> training.TrainState:
    tcfg = config.training
    data_iter = pipeline.train_iterator(
        config.data,
        seed=config.seed,
        global_batch_size=tcfg.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    restored = checkpointer.restore_latest_readable(setup.abstract_state, data_iter)
    if restored is not None:
        state = restored
        logging.info("Resumed from step %d in %s", int(state.step), workdir)
    else:
        state = setup.init_state(jax.random.PRNGKey(config.seed))
        logging.info("Starting a new run in %s", workdir)
    step = last_saved = int(state.step)
    # Only now: a config.json rewritten before a failed restore would misdescribe the run.
    write_config(config, workdir)
    _truncate_metrics(workdir, step)

    train_step = jax.jit(
        training.make_train_step(
            setup.model, setup.schedule, setup.optimizer, config.diffusion, tcfg.ema_decay
        ),
        in_shardings=(setup.replicated, parallel.batch_sharding(setup.mesh)),
        out_shardings=(setup.replicated, setup.replicated),
        donate_argnums=0,
    )
    writer = MetricWriter(workdir, enabled=is_chief())
    grid_fn = setup.sample_fn(config, _grid_batch_size(tcfg.num_grid_samples, setup.mesh))
    nan_steps = set(tcfg.debug_nan_steps)
    save_seconds, num_saves = 0.0, 0

    def save() -> None:
        nonlocal last_saved, save_seconds, num_saves
        if not checkpointing.all_finite(state):  # the step guard should make this unreachable
            raise NonFiniteError(f"the state at step {step} holds NaN or Inf; not saving it")
        started = time.perf_counter()
        checkpointer.save(step, state, data_iter)
        save_seconds += time.perf_counter() - started
        num_saves += 1
        last_saved = step
        if tcfg.debug_sleep_after_save:
            time.sleep(tcfg.debug_sleep_after_save)

    loop_start = time.perf_counter()
    window_start, window_steps, last_logged = loop_start, 0, -1

    def log(at_step: int, step_metrics: dict[str, jax.Array]) -> None:
        nonlocal window_start, window_steps, last_logged
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        scalars["steps_per_sec"] = window_steps / (time.perf_counter() - window_start)
        scalars["images_per_sec"] = scalars["steps_per_sec"] * tcfg.batch_size
        writer.write(at_step, scalars)
        logging.info(
            "step %d/%d  loss %.4f  %.2f steps/s  ETA %s",
            at_step,
            tcfg.num_train_steps,
            scalars["loss"],
            scalars["steps_per_sec"],
            _format_seconds((tcfg.num_train_steps - at_step) / scalars["steps_per_sec"]),
        )
        window_start, window_steps, last_logged = time.perf_counter(), 0, at_step

    def check_nonfinite(at_step: int, step_metrics: dict[str, jax.Array]) -> None:
        consecutive = int(step_metrics["consecutive_nonfinite"])
        if consecutive >= tcfg.max_consecutive_nonfinite and last_logged != at_step:
            log(at_step, step_metrics)  # the step that stops the run is always in the log
        if consecutive:
            _report_nonfinite(at_step, consecutive, last_saved, tcfg.max_consecutive_nonfinite)

    # (step, metrics) of the previous step. Its non-finite counter is read only once the next
    # step is queued: the guard itself runs inside train_step, so reporting a step late keeps
    # the accelerator busy instead of making the host wait for every step to finish.
    pending: tuple[int, dict[str, jax.Array]] | None = None
    try:
        while step < tcfg.num_train_steps and not _stop_requested(sigterm, step):
            host_batch = next(data_iter)
            if step + 1 in nan_steps:
                host_batch = {**host_batch, "image": np.full_like(host_batch["image"], np.nan)}
            batch = parallel.global_batch(host_batch, setup.mesh)
            state, metrics = train_step(state, batch)
            step += 1
            window_steps += 1
            if pending is not None:
                check_nonfinite(*pending)
            pending = (step, metrics)
            last = step == tcfg.num_train_steps
            logs = step % tcfg.log_every == 0 or last
            saves = step % tcfg.checkpoint_every == 0 or last
            samples = bool(tcfg.sample_every and step % tcfg.sample_every == 0) or last
            if logs:
                log(step, metrics)
            if logs or saves or samples:  # waiting for this step anyway: check it before saving
                check_nonfinite(*pending)
                pending = None
            if saves:
                save()
            if samples:
                _write_training_grid(setup, config, grid_fn, state, workdir, step)
        if pending is not None:
            check_nonfinite(*pending)
        if step < tcfg.num_train_steps:  # stopped early: SIGTERM on some process
            logging.warning(
                "SIGTERM at step %d: saving a checkpoint and stopping; rerun the same command "
                "to resume.",
                step,
            )
            if step > last_saved:
                save()
    finally:
        writer.close()
    loop_seconds = time.perf_counter() - loop_start
    logging.info(
        "Checkpointing blocked training for %.2f s over %d saves (%.1f%% of %.1f s).",
        save_seconds,
        num_saves,
        100.0 * save_seconds / max(loop_seconds, 1e-9),
        loop_seconds,
    )
    return state


# Multi-process runs agree on SIGTERM with an all-gather; doing it every step would stall the
# pipeline, and a pre-emption grace period is many steps long.
_SIGTERM_POLL_STEPS = 10


def _stop_requested(sigterm: _SigtermFlag, step: int) -> bool:
    """Whether to stop before `step + 1`; collective in multi-process runs (all processes must
    stop at the same step, or the ones still training wait forever for the one saving)."""
    if jax.process_count() == 1:
        return sigterm.received
    return step % _SIGTERM_POLL_STEPS == 0 and parallel.any_process(sigterm.received)


def _report_nonfinite(step: int, consecutive: int, last_saved: int, limit: int) -> None:
    """Warn about a skipped step; raise `NonFiniteError` once `limit` are skipped in a row."""
    logging.warning(
        "step %d: non-finite loss or gradients; update skipped (%d in a row, limit %d)",
        step,
        consecutive,
        limit,
    )
    if consecutive >= limit:
        kept = (
            f"checkpoint {last_saved} (finite) is the latest"
            if last_saved
            else "no checkpoint was saved yet"
        )
        raise NonFiniteError(
            f"{consecutive} consecutive steps up to step {step} had a non-finite loss or "
            f"gradients (training.max_consecutive_nonfinite={limit}); stopped, {kept}: lower "
            "training.learning_rate, set training.grad_clip or check the data, then rerun"
        )


def sample(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> str:
    """Write `<workdir>/samples/<name>.npz` and `.png` from the latest checkpoint's EMA params.

    Refuses (`ConfigError`) a config whose model, data or diffusion keys differ from the run's
    saved `config.json` (sampling a v-prediction model as eps would give wrong images silently)
    unless `allow_config_change`. Returns the path of the .npz file.
    """
    scfg = config.sampling
    validate_config(config, num_devices=jax.device_count())
    checkpointing.require_checkpoint(workdir)
    check_saved_config(config, workdir, allow_config_change)
    setup = _Setup(config)
    state = setup.restore(workdir)
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
    if is_chief():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        labels_fn = setup.labels_fn(config)
        labels = None if labels_fn is None else labels_fn(np.arange(len(samples)))
        _atomic_savez(path, samples, labels)
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
    if is_chief():
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        images.save_grid(os.path.join(workdir, "samples", f"train_step{step}.png"), grid)


def _grid_batch_size(num_samples: int, mesh: jax.sharding.Mesh) -> int:
    """Smallest multiple of the device count that holds `num_samples`."""
    devices = mesh.devices.size
    return -(-num_samples // devices) * devices


def _atomic_savez(path: str, samples: np.ndarray, labels: np.ndarray | None = None) -> None:
    """`images` uint8 (N, H, W, C), and for a class-conditional model `labels` int32 (N,)."""
    tmp = path + ".tmp.npz"
    if labels is None:
        np.savez(tmp, images=samples)
    else:
        np.savez(tmp, images=samples, labels=labels)
    os.replace(tmp, path)


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
