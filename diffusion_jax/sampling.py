"""Generate many samples from a trained model, sharded over devices, independent of batching.

Sample `i` of a run uses the key `fold_in(rng, i)` (see `samplers.sample`'s `sample_ids`), so
the images written for a seed do not depend on the sampling batch size or the device count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from diffusion_jax import images, parallel, samplers, schedules
from diffusion_jax.models.unet import UNet

PyTree = Any


def sample_name(sampling_config: ml_collections.ConfigDict) -> str:
    """File stem for a sample set: the configured name, else e.g. 'ddim50_seed0'."""
    if sampling_config.name:
        return sampling_config.name
    sampler = sampling_config.sampler.replace("+", "p")
    return f"{sampler}{sampling_config.num_steps}_seed{sampling_config.seed}"


def sample_labels(
    sample_ids: np.ndarray, sampling_config: ml_collections.ConfigDict, num_classes: int
) -> np.ndarray:
    """int32 (B,) class of each sample: the configured label, or ids cycling through classes."""
    if sampling_config.label >= 0:
        return np.full(sample_ids.shape, sampling_config.label, np.int32)
    return (sample_ids % num_classes).astype(np.int32)


def make_sample_fn(
    model: UNet,
    schedule: schedules.Schedule,
    sampling_config: ml_collections.ConfigDict,
    prediction: str,
    image_shape: tuple[int, int, int],
    batch_size: int,
    mesh: Mesh,
) -> Callable[[PyTree, jax.Array, jax.Array, jax.Array | None], jax.Array]:
    """A jitted `fn(params, rng, sample_ids (B,), labels (B,) | None) -> (B, H, W, C) float32`.

    The batch axis is sharded over the mesh; params are replicated.
    """
    parallel.check_divisible_batch(batch_size, mesh, "sampling.batch_size")

    def generate(
        params: PyTree, rng: jax.Array, sample_ids: jax.Array, labels: jax.Array | None
    ) -> jax.Array:
        def model_fn(x_t: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
            return cast(jax.Array, model.apply({"params": params}, x_t, t, labels, train=False))

        return samplers.sample(
            model_fn,
            schedule,
            (batch_size, *image_shape),
            rng,
            sampler=sampling_config.sampler,
            num_steps=sampling_config.num_steps,
            eta=sampling_config.eta,
            prediction=prediction,
            clip_x0=sampling_config.clip_x0,
            temperature=sampling_config.temperature,
            timestep_spacing=sampling_config.timestep_spacing,
            variance=sampling_config.variance,
            labels=labels,
            guidance_scale=sampling_config.guidance_scale,
            num_classes=model.num_classes,
            sample_ids=sample_ids,
        )

    replicated, batch = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    return jax.jit(
        generate, in_shardings=(replicated, replicated, batch, batch), out_shardings=batch
    )


def generate_batches(
    sample_fn: Callable[..., jax.Array],
    params: PyTree,
    *,
    seed: int,
    num_samples: int,
    batch_size: int,
    labels_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[np.ndarray]:
    """Yield uint8 (b, H, W, C) batches of samples 0..num_samples-1 in order.

    The last batch is padded to `batch_size` (so nothing recompiles) and trimmed.
    """
    rng = jax.random.PRNGKey(seed)
    for start in range(0, num_samples, batch_size):
        ids = np.arange(start, start + batch_size, dtype=np.int32)
        labels = None if labels_fn is None else jnp.asarray(labels_fn(ids))
        x = sample_fn(params, rng, jnp.asarray(ids), labels)
        count = min(batch_size, num_samples - start)
        yield images.to_uint8(np.asarray(jax.device_get(x))[:count])
