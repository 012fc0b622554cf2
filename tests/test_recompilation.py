"""Nothing recompiles once warm: the train step and the sampler, called as the runner calls
them, with new values of the same shapes.

A recompilation in the training loop or in sample generation costs seconds to minutes per call
(30 s for the digits train step on 2 busy cores), so it would dominate a run without failing
anything. JAX logs "Compiling <fn> ..." for every XLA compilation under `jax.log_compiles()`;
the tests count those records.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import jax
import numpy as np
import pytest

from diffusion_jax import parallel
from diffusion_jax.runner import generate
from diffusion_jax.runner.setup import ModelSetup
from tests.conftest import make_tiny_config


class _CompileLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.compiled: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.compiled.append(message.split(" with ")[0])


@contextmanager
def compile_log() -> Iterator[list[str]]:
    """The names of the programs XLA compiles inside the block."""
    handler = _CompileLog()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield handler.compiled
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def setup(digits_data_dir: str) -> ModelSetup:
    """What the runner builds for the tiny config: model, schedule, optimizer, mesh."""
    return ModelSetup(make_tiny_config(digits_data_dir))


def test_train_step_compiles_once_across_steps_with_new_batches(setup: ModelSetup) -> None:
    train_step = setup.train_step()  # the jitted step the training loop runs
    rng = np.random.default_rng(0)
    batch_size = setup.config.training.batch_size

    def batch() -> dict:  # random numpy arrays, as the data iterator yields them
        host = {
            "image": rng.uniform(-1, 1, (batch_size, *setup.image_shape)).astype(np.float32),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
        }
        return parallel.global_batch(host, setup.mesh)

    state = setup.init_state(jax.random.PRNGKey(0))
    with compile_log() as compiled:
        state, metrics = train_step(state, batch())  # the step's one compilation
        jax.block_until_ready(metrics)
        first = list(compiled)
        for _ in range(4):  # a state from the step itself, new data and per-step rng
            state, metrics = train_step(state, batch())
        jax.block_until_ready((state, metrics))
    assert len(first) == 1 and "train_step" in first[0], first
    assert compiled == first, f"recompiled after the first step: {compiled[len(first) :]}"
    assert int(state.step) == 5


def test_sampler_compiles_once_for_new_seeds_ids_and_params(setup: ModelSetup) -> None:
    params = jax.device_put(setup.init_state(jax.random.PRNGKey(0)).ema_params, setup.replicated)
    batch_size = 4
    sample_fn = setup.sample_fn(batch_size)  # the jitted sampler sample and eval modes run
    new_params = jax.tree.map(lambda p: p * 1.01, params)
    with compile_log() as compiled:
        first_images = list(
            generate.generate_batches(
                sample_fn, params, seed=0, num_samples=6, batch_size=batch_size
            )
        )
        first = list(compiled)
        # New seed, new sample ids (a padded last batch included) and new parameter values.
        second_images = list(
            generate.generate_batches(
                sample_fn, new_params, seed=1, num_samples=7, batch_size=batch_size, first_id=3
            )
        )
    sampler_compiles = [name for name in first if "generate" in name]
    assert len(sampler_compiles) == 1, first
    assert compiled == first, f"recompiled on the second call: {compiled[len(first) :]}"
    assert [len(b) for b in first_images] == [4, 2]
    assert [len(b) for b in second_images] == [4, 3]
