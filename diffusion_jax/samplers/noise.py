"""Per-sample noise: sample i draws from key_i = fold_in(rng, sample_ids[i]).

x_T ~ N(0, I) comes from fold_in(key_i, 0) and the noise a sampler injects at step k from
fold_in(key_i, k + 1) (RePaint numbers its draws its own way, see `editing.inpaint`). So sample
i does not depend on the batch it is drawn in, nor on how a run is split over devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def resolve_sample_ids(sample_ids: Array | None, batch: int) -> Array:
    """sample_ids (B,) as given (checked), default arange(B)."""
    if sample_ids is None:
        return jnp.arange(batch, dtype=jnp.int32)
    if jnp.shape(sample_ids) != (batch,):
        raise ValueError(f"sample_ids must have shape ({batch},); got {jnp.shape(sample_ids)}")
    return jnp.asarray(sample_ids)


@dataclasses.dataclass(frozen=True)
class Noise:
    """Draws N(0, I) noise (B, *shape) with one key per sample: `noise(index)`."""

    keys: Array  # (B,) key_i = fold_in(rng, sample_ids[i])
    shape: tuple[int, ...]  # one sample's
    dtype: Any

    @classmethod
    def for_samples(
        cls, rng: Array, sample_ids: Array, shape: tuple[int, ...], dtype: Any
    ) -> Noise:
        """Noise for the samples `sample_ids` (B,) of the batch shape (B, ...) `shape`."""
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(sample_ids))
        return cls(keys=keys, shape=tuple(shape[1:]), dtype=dtype)

    def __call__(self, index: Any) -> Array:
        """Per-sample N(0, I) noise (B, ...) from fold_in(key_i, index)."""
        return jax.vmap(
            lambda key: jax.random.normal(jax.random.fold_in(key, index), self.shape, self.dtype)
        )(self.keys)
