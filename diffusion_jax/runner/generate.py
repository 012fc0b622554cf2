"""Generate many samples from a trained model, sharded over devices, independent of batching.

Sample `i` of a run uses the key `fold_in(rng, i)` (see `samplers.sample`'s `sample_ids`), so
the images written for a seed do not depend on the sampling batch size, the device count or the
process count. Multi-process: every process runs the same calls with the same (host-replicated)
ids, each computes its devices' rows, and the results are all-gathered so every process holds
the whole batch (the chief writes it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from diffusion_jax import diffusion, formulations, images, parallel, samplers
from diffusion_jax.data_gaussian import DataGaussian
from diffusion_jax.errors import NonFiniteError
from diffusion_jax.models.unet import UNet
from diffusion_jax.runner import ema_snapshots
from diffusion_jax.runner import formulation as formulation_lib
from diffusion_jax.runner import guide as guide_lib
from diffusion_jax.runner import workdir as workdir_lib

PyTree = Any
HostOrDevice = jax.Array | np.ndarray
SampleFn = Callable[[PyTree, HostOrDevice, HostOrDevice, HostOrDevice | None], jax.Array]


def sample_name(config: ml_collections.ConfigDict, spec: samplers.SamplerSpec | None = None) -> str:
    """File stem for a sample set: `sampling.name` (a plain name), else every setting that
    changes the samples (`SamplerSpec.name`), the label, the parameters, the guide and the
    seed, e.g. 'ddim50_eta0.5_seed0' or 'dpm_solverpp20_g2_gi0.3-5_agstep1000_seed0'. spec: the
    config's, if already built."""
    if config.sampling.name:
        return workdir_lib.output_name(config.sampling.name, "sampling.name")
    spec = spec or samplers.SamplerSpec.from_config(config)
    parts = [spec.name(formulation_lib.from_config(config))]
    if config.sampling.label >= 0:
        parts.append(f"label{config.sampling.label}")
    if (sigma_rel := ema_snapshots.parse_params(config.sampling.get("params", "ema"))) is not None:
        parts.append(f"phema{sigma_rel:g}")
    if (source := guide_lib.of_config(config)) is not None:
        parts.append(source.label)
    return "_".join([*parts, f"seed{config.sampling.seed}"])


def sample_labels(
    sample_ids: np.ndarray, sampling_config: ml_collections.ConfigDict, num_classes: int
) -> np.ndarray:
    """int32 (B,) class of each sample: the configured label, or ids cycling through classes."""
    if sampling_config.label >= 0:
        return np.full(sample_ids.shape, sampling_config.label, np.int32)
    return (sample_ids % num_classes).astype(np.int32)


def device_multiple(n: int, num_devices: int) -> int:
    """The smallest multiple of `num_devices` that is >= n: a batch that holds n samples and
    splits evenly over the devices."""
    return -(-n // num_devices) * num_devices


def device_batch_size(batch_size: int, num_devices: int, num_samples: int | None = None) -> int:
    """The batch a sampling loop runs for a configured `batch_size` on `num_devices`: rounded
    down to a multiple of `num_devices` (at least `num_devices`), and no larger than the
    multiple that holds `num_samples`. Samples do not depend on the batch size (per-sample
    seeds), so `sampling.batch_size` and `eval.batch_size` need not divide over the devices."""
    per_call = max(num_devices, batch_size // num_devices * num_devices)
    if num_samples is not None:
        per_call = min(per_call, device_multiple(num_samples, num_devices))
    return per_call


def make_sample_fn(
    model: UNet,
    formulation: formulations.Formulation,
    spec: samplers.SamplerSpec,
    image_shape: tuple[int, int, int],
    batch_size: int,
    mesh: Mesh,
    data_gaussian: DataGaussian | None = None,
    compiler_options: dict[str, Any] | None = None,
    guide: guide_lib.Guide | None = None,
) -> SampleFn:
    """`fn(params, rng, sample_ids (B,), labels (B,) | None) -> (B, H, W, C) float32`, jitted.

    data_gaussian: the data's Gaussian model for a Gaussian start (passed to the
    compiled sampler as a replicated argument, not embedded in it). guide: autoguidance's
    guide network, evaluated in the same program (its parameters a replicated argument).
    The batch axis is sharded over the mesh; params (gathered onto every device if they are
    split along 'fsdp') and rng (uint32 (2,) key data) are replicated. rng, ids and labels may
    be numpy values that every process holds whole; the output is a global array (see
    `parallel.to_host`). compiler_options: passed to jit (`xla_options.compiler_options`).
    """
    parallel.check_divisible_batch(batch_size, mesh, "sampling.batch_size")

    def generate(
        params: PyTree,
        rng: jax.Array,
        sample_ids: jax.Array,
        labels: jax.Array | None,
        gaussian: DataGaussian | None,
        guide_params: PyTree,
    ) -> jax.Array:
        return cast(
            jax.Array,
            spec.sample(
                network(model, params),
                formulation,
                (batch_size, *image_shape),
                rng,
                labels=labels,
                guide_fn=None if guide is None else network(guide.model, guide_params),
                sample_ids=sample_ids,
                data_gaussian=gaussian,
            ),
        )

    replicated, batch = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    guide_params = None if guide is None else jax.device_put(guide.params, replicated)
    jitted = jax.jit(
        generate,
        in_shardings=(replicated, replicated, batch, batch, replicated, replicated),
        out_shardings=batch,
        compiler_options=compiler_options,
    )
    gaussian = None
    if data_gaussian is not None:
        host = jax.tree.map(lambda a: np.asarray(a, diffusion.float_dtype()), data_gaussian)
        gaussian = jax.tree.map(lambda a: _as_global(a, replicated), host)

    def sample_fn(
        params: PyTree,
        rng: HostOrDevice,
        sample_ids: HostOrDevice,
        labels: HostOrDevice | None,
    ) -> jax.Array:
        # Host values (numpy, or arrays on one device) are the same global value on every
        # process; make them global arrays explicitly, which jit cannot do across processes.
        # Parameters split along 'fsdp' (a train state's EMA) are gathered once here, not at
        # every step of the sampler; replicated ones are passed through as they are.
        return jitted(
            jax.device_put(params, replicated),
            _as_global(rng, replicated),
            _as_global(sample_ids, batch),
            None if labels is None else _as_global(labels, batch),
            gaussian,
            guide_params,
        )

    return sample_fn


def network(model: Any, params: PyTree) -> Callable[..., jax.Array]:
    """`fn(x_t (B, H, W, C), t (B,), labels (B,) | None = None) -> output` of a model's
    parameters, eval mode."""

    def fn(x_t: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        return cast(jax.Array, model.apply({"params": params}, x_t, t, labels, train=False))

    return fn


def _as_global(value: HostOrDevice, sharding: jax.sharding.Sharding) -> jax.Array:
    """`value` with `sharding`: kept when already so placed, else built from its host copy."""
    if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
        return value
    return parallel.host_to_global(np.asarray(value), sharding)


def generate_batches(
    sample_fn: Callable[..., jax.Array],
    params: PyTree,
    *,
    seed: int,
    num_samples: int,
    batch_size: int,
    labels_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    first_id: int = 0,
) -> Iterator[np.ndarray]:
    """Yield uint8 (b, H, W, C) batches of samples first_id..first_id+num_samples-1 in order,
    on every process.

    sample_fn: from `make_sample_fn` (batch `batch_size`); called with numpy rng key data (2,)
      uint32, ids (batch_size,) int32 and labels (batch_size,) int32 or None.
    The last batch is padded to `batch_size` (so nothing recompiles) and trimmed. With several
    processes every one must iterate (each step all-gathers the batch). Raises `NonFiniteError`
    for a batch holding NaN or Inf (`check_finite`) instead of yielding black images.
    """
    rng = np.asarray(jax.random.PRNGKey(seed))
    for start in range(0, num_samples, batch_size):
        ids = np.arange(first_id + start, first_id + start + batch_size, dtype=np.int32)
        labels = None if labels_fn is None else np.asarray(labels_fn(ids), np.int32)
        x = parallel.to_host(sample_fn(params, rng, ids, labels))
        count = min(batch_size, num_samples - start)
        yield images.to_uint8(check_finite(x[:count], first_id=int(ids[0])))


def check_finite(samples: np.ndarray, *, first_id: int = 0) -> np.ndarray:
    """`samples` (B, ...) unchanged when all finite; else `NonFiniteError` naming the samples
    (ids from `first_id`): NaN would be cast to black pixels and written as if it were an image.
    """
    bad = np.flatnonzero(~np.isfinite(samples.reshape(len(samples), -1)).all(axis=1))
    if len(bad):
        ids = ", ".join(str(first_id + i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise NonFiniteError(
            f"{len(bad)} of {len(samples)} samples (ids {ids}) came out NaN or Inf, so no images "
            "were written; the checkpoint's EMA parameters or the sampler settings (sampling.*) "
            "produce non-finite values: check the run's loss in metrics.jsonl, or try another "
            "sampler or number of steps"
        )
    return samples
