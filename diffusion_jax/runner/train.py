"""`--mode=train`: train, or resume, a run in its workdir.

`train(config, workdir)` resumes from the latest readable checkpoint in `workdir` when there is
one, so rerunning the same command continues a run, bit for bit, after any interruption:
SIGKILL, a crash or SIGTERM (which saves a checkpoint at the current step and returns).
`metrics.jsonl` is truncated on resume to the records up to the restored step, so each step
appears once. Progress goes through `absl.logging`; nothing is printed.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType, TracebackType
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import checkpointing, parallel, train_state
from diffusion_jax.data import pipeline
from diffusion_jax.errors import NonFiniteError
from diffusion_jax.runner import ema_snapshots, generate, validation, workdir_lock
from diffusion_jax.runner import guide as guide_lib
from diffusion_jax.runner import workdir as workdir_lib
from diffusion_jax.runner.setup import ModelSetup

VALIDATORS = validation.TRAINING_VALIDATORS
LOCK_FILE = "train.lock"


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


def train(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> train_state.TrainState:
    """Train (or resume) until `config.training.num_train_steps`; returns the final state.

    Before anything is compiled, refuses (`ConfigError`) an invalid config, an unwritable
    workdir, and a workdir whose checkpoints were written with different
    `validation.RESUME_LOCKED_KEYS` values unless `allow_config_change`; and
    (`WorkdirLockedError`) a workdir another training run holds (`<workdir>/train.lock`). On
    SIGTERM it
    saves a checkpoint at the current step and returns the state early. Raises `NonFiniteError`
    after `training.max_consecutive_nonfinite` skipped steps in a row, and
    `CheckpointSaveError` when a save fails (both `errors.UserError`).
    """
    validation.validate(config, jax.device_count(), VALIDATORS)
    validation.check_workdir_writable(workdir)
    # Before anything reads or cleans up checkpoints: a second trainer would delete the first
    # one's in-flight save as a leftover temporary, and both would write the same steps.
    with workdir_lock.hold(
        workdir_lib.join(workdir, LOCK_FILE),
        what="training run",
        fix="wait for it to finish or stop it (rerunning then resumes), or use another --workdir",
    ):
        validation.check_saved_config(
            config,
            workdir,
            allow_config_change,
            keys=(*validation.RESUME_LOCKED_KEYS, *validation.TRAINING_LOCKED_KEYS),
        )
        validation.check_posthoc_resume(config, workdir)
        setup = ModelSetup(config)
        validation.check_splits(config, setup.info.num_examples, ["data.train_split"])
        checkpointer = checkpointing.Checkpointer(
            workdir,
            max_to_keep=config.training.max_checkpoints_to_keep,
            metadata={"config": workdir_lib.config_json(config)},
        )
        # The handler stays until the last save is on disk: a second SIGTERM must not cut it
        # short.
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
    setup: ModelSetup,
    checkpointer: checkpointing.Checkpointer,
    sigterm: _SigtermFlag,
) -> train_state.TrainState:
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
    workdir_lib.write_config(config, workdir)
    workdir_lib.truncate_metrics(workdir, step)
    # Post-hoc EMA snapshots the interrupted run wrote after this checkpoint: this run writes
    # its own (the same, when the config is unchanged), never a mixture.
    if removed := ema_snapshots.remove_after(workdir, step):
        logging.info(
            "Removed the post-hoc EMA snapshots of steps %s (after step %d)", removed, step
        )
    snapshot_every = tcfg.get("posthoc_ema_every", 0)

    train_step = setup.train_step()
    writer = workdir_lib.MetricWriter(workdir)
    grid_spec = setup.sampler_spec()
    if guide_lib.of_config(config) is not None:  # the guide is a trained model: grids unguided
        grid_spec = grid_spec.replace(guidance_scale=1.0)
    grid_fn = setup.sample_fn(
        generate.device_multiple(tcfg.num_grid_samples, setup.mesh.size), grid_spec, workdir
    )
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
            snapshot = bool(snapshot_every) and (step % snapshot_every == 0 or last)
            if logs:
                log(step, metrics)
            if logs or saves or samples or snapshot:  # waiting anyway: check it before saving
                check_nonfinite(*pending)
                pending = None
            if snapshot:  # before the checkpoint: one at this step never lacks its snapshot
                ema_snapshots.write_snapshot(
                    workdir,
                    step,
                    state.posthoc_emas,
                    setup.posthoc_sigma_rels,
                    setup.posthoc_gammas,
                )
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


def _write_training_grid(
    setup: ModelSetup,
    config: ml_collections.ConfigDict,
    grid_fn: Any,
    state: train_state.TrainState,
    workdir: str,
    step: int,
) -> None:
    num = config.training.num_grid_samples
    batches = generate.generate_batches(
        grid_fn,
        state.ema_params,
        seed=config.sampling.seed,
        num_samples=num,
        batch_size=generate.device_multiple(num, setup.mesh.size),
        labels_fn=setup.labels_fn(),
    )
    try:
        grid = np.concatenate(list(batches))
    except NonFiniteError as error:  # a picture is not worth stopping the run for
        logging.warning("step %d: no sample grid written: %s", step, error)
        return
    if workdir_lib.is_chief():
        path = workdir_lib.contained_path(workdir, "samples", f"train_step{step}.png")
        workdir_lib.write_grid(path, grid)


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
