"""What the benchmarks build: configs, models with random parameters, the eval-mode forward,
and the train step jitted as the training loop runs it.

The train step always goes through `diffusion_jax.runner.setup.jit_train_step` (replicated
state, batch sharded over the mesh, state donated), so the benchmarks time the step that
trains. `ModelSetup(config).train_step()` wires it the same way but needs the config's dataset
prepared; the benchmarks feed random images instead, so they build the model, formulation and
optimizer from the config directly, as `ModelSetup` does.
"""

from __future__ import annotations

import dataclasses
import os
import runpy
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from benchmarks import common, timing
from diffusion_jax import formulations, parallel, train_state
from diffusion_jax.models.unet import UNet
from diffusion_jax.runner import formulation as formulation_lib
from diffusion_jax.runner import xla_options
from diffusion_jax.runner.setup import jit_train_step

CONFIGS = {"digits": "configs/digits.py", "cifar10": "configs/cifar10_ddpm.py"}
# Both datasets have 10 classes; the count only matters to class-conditional configs.
NUM_CLASSES = 10


def load_config(
    name: str, dtype: str | None = None, ynnpack_ops: str | None = None
) -> ml_collections.ConfigDict:
    """A config by short name ('digits', 'cifar10') or path, with `model.dtype` = `dtype` and
    `xla.cpu_ynnpack_ops` = `ynnpack_ops` where given (None keeps the config's)."""
    path = CONFIGS.get(name, name)
    config = runpy.run_path(os.path.join(common.REPO, path))["get_config"]()
    if dtype is not None:
        config.model.dtype = dtype
    if ynnpack_ops is not None:
        config.xla.cpu_ynnpack_ops = ynnpack_ops
    return config


def jit(config: ml_collections.ConfigDict, fn: Callable[..., Any]) -> Any:
    """`fn` jitted with the config's compiler options (`xla.cpu_ynnpack_ops`), as the runner
    jits its train step and samplers."""
    return jax.jit(fn, compiler_options=xla_options.compiler_options(config))


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    channels = 1 if config.data.name == "digits" else 3
    return (config.data.image_size, config.data.image_size, channels)


def create_model(config: ml_collections.ConfigDict) -> UNet:
    return train_state.create_model(config.model, NUM_CLASSES)


def get_formulation(config: ml_collections.ConfigDict) -> formulations.Formulation:
    """The config's formulation (`diffusion.formulation`), as the runner builds it."""
    return formulation_lib.from_config(config)


def random_params(model: UNet, shape: tuple[int, int, int]) -> Any:
    """Parameters with the model's shapes, from numpy: speed does not depend on the values, and
    this skips compiling the (large) initialiser."""
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, train=False), x, t)
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, dtype=np.float32)),
        shapes["params"],
    )


def num_params(params: Any) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))


def eval_forward(model: UNet) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """`forward(params, x_t, t)`: one eval-mode model call (one DDIM / DPM-Solver++ step)."""

    def forward(params: Any, x: jax.Array, t: jax.Array) -> jax.Array:
        return cast(jax.Array, model.apply({"params": params}, x, t, train=False))

    return forward


def random_inputs(batch: int, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Random x_t (batch, *shape) and timesteps (batch,) for the forward."""
    x = jax.random.normal(jax.random.key(1), (batch, *shape), jnp.float32)
    t = jax.random.randint(jax.random.key(2), (batch,), 0, 1000, jnp.int32)
    return x, t


def random_batch(batch: int, shape: tuple[int, ...], lead: tuple[int, ...] = ()) -> dict:
    """A host batch of random images in [-1, 1] and labels, with extra leading axes `lead`."""
    rng = np.random.default_rng(0)
    return {
        "image": rng.uniform(-1, 1, (*lead, batch, *shape)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, (*lead, batch)).astype(np.int32),
    }


@dataclasses.dataclass
class TrainCase:
    """A config's train step, ready to time: the pure step, the same step jitted as training
    runs it (`jitted`), a fresh replicated state and a sharded random batch."""

    config: ml_collections.ConfigDict
    model: UNet
    formulation: formulations.Formulation
    optimizer: optax.GradientTransformation
    mesh: Mesh
    step: Callable[..., Any]
    jitted: Any
    state: train_state.TrainState
    batch: dict[str, jax.Array]
    compiled: Any = None

    def compile(self) -> float:
        """Compiles `jitted` for the state and batch ahead of time; returns the seconds taken."""
        self.compiled, seconds = timing.compile_timed(self.jitted, self.state, self.batch)
        return seconds

    def run(self) -> Any:
        """One step, the new state kept (the old one was donated); returns (state, metrics)."""
        step = self.jitted if self.compiled is None else self.compiled
        self.state, metrics = step(self.state, self.batch)
        return self.state, metrics


def train_case(config: ml_collections.ConfigDict, batch_size: int) -> TrainCase:
    """The train step of `config` on a mesh over all devices, fed `batch_size` random images."""
    shape = image_shape(config)
    model = create_model(config)
    formulation = get_formulation(config)
    optimizer = train_state.create_optimizer(config.training)
    mesh = parallel.create_mesh()
    parallel.check_divisible_batch(batch_size, mesh)
    state = jax.jit(
        lambda rng: train_state.init_train_state(model, optimizer, rng, shape),
        out_shardings=parallel.replicated_sharding(mesh),
    )(jax.random.PRNGKey(0))
    step = train_state.make_train_step(
        model,
        formulation,
        optimizer,
        config.diffusion.label_dropout,
        config.training.ema_decay,
        config.training.ema_warmup,
    )
    return TrainCase(
        config=config,
        model=model,
        formulation=formulation,
        optimizer=optimizer,
        mesh=mesh,
        step=step,
        jitted=jit_train_step(step, mesh, compiler_options=xla_options.compiler_options(config)),
        state=state,
        batch=parallel.global_batch(random_batch(batch_size, shape), mesh),
    )
