"""Running a `SamplerSpec`: the model, noise, start and grid every sampler shares, then the
sampler's scan (`run`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, guidance
from diffusion_jax.data_gaussian import DataGaussian
from diffusion_jax.formulations import Formulation, vp_alpha
from diffusion_jax.samplers.base import Chain, Denoiser
from diffusion_jax.samplers.noise import Noise, resolve_sample_ids
from diffusion_jax.values import is_int

Array = jax.Array


class Trajectory(NamedTuple):
    """What the model saw at each of the K evaluations of a sampler (K = its
    `num_evaluations(N)`: N, or 2N - 1 for heun).

    timesteps: (K,) the network's time input (int32 timesteps for the ddpm formulation);
    sigmas: (K,) the levels; x_t: (K, B, ...) the network's inputs (the formulation's own
    coordinates); x0_pred: (K, B, ...) x0 predictions (after clipping).
    """

    timesteps: Array
    x_t: Array
    x0_pred: Array
    sigmas: Array


def run(
    spec: Any,
    model_fn: Callable[..., Array],
    formulation: Formulation,
    shape: tuple[int, ...],
    rng: Array,
    *,
    labels: Array | None = None,
    guide_fn: Callable[..., Array] | None = None,
    sample_ids: Array | None = None,
    x_init: Array | None = None,
    start_sigma: float | None = None,
    return_trajectory: bool = False,
    data_gaussian: DataGaussian | None = None,
) -> Any:
    """Samples (B, ...) = `shape` with `spec` (a `SamplerSpec`) of the model
    `model_fn(x, time[, labels])` (the network, in the formulation's own coordinates and time
    input).

    labels: (B,) int for a class-conditional model (guidance: spec.guidance_scale).
    guide_fn: the guide network of autoguidance, called like model_fn (the same labels); with
    it spec.guidance_scale guides the model by it instead of by its unconditional output.
    sample_ids: (B,) int, default arange(B): sample i draws its noise from
    fold_in(rng, sample_ids[i]) (x at the start from index 0, step k's from k + 1), so it does
    not depend on the batch it is drawn in.
    x_init: (B, ...) start from this x (own coordinates) at the grid's first level instead of
    noise; with start_sigma the chain starts part-way, at that level (SDEdit; the grid is
    spaced from it). data_gaussian: the data's Gaussian model, for the Gaussian start.
    Returns x0 samples in JAX's default float dtype, and with return_trajectory a `Trajectory`.
    Raises ValueError (before tracing the model) for bad options, naming the fix.
    """
    spec.validate(formulation, start_sigma)
    shape = tuple(shape)
    if not shape or not all(is_int(d) and d >= 1 for d in shape):
        raise ValueError(f"shape must be a tuple of positive ints (B, ...); got {shape!r}")
    batch = shape[0]
    dtype = diffusion.float_dtype()
    denoise = denoiser(spec, model_fn, formulation, shape, dtype, labels=labels, guide_fn=guide_fn)
    sample_ids = resolve_sample_ids(sample_ids, batch)
    if x_init is not None and jnp.shape(x_init) != shape:
        raise ValueError(f"x_init must have shape {shape}; got {jnp.shape(x_init)}")
    gaussian_start = spec.start_sigma(formulation)
    if gaussian_start is not None:
        _check_data_gaussian(data_gaussian, shape)
    noise = Noise.for_samples(rng, sample_ids, shape, dtype)
    sigmas = spec.grid(formulation, start_sigma if gaussian_start is None else gaussian_start)
    if gaussian_start is None:
        x = _start(formulation, float(sigmas[0]), x_init, noise)
    else:
        assert data_gaussian is not None
        top = prior_sigma(spec, formulation)
        x = _start(formulation, top, x_init, noise)
        x = data_gaussian.flow(x, vp_alpha(top) ** 2, vp_alpha(sigmas[0]) ** 2)
    chain = Chain(
        sigmas=sigmas,
        x_init=jnp.asarray(x, dtype),
        denoise=denoise,
        noise=noise,
        options=spec.options,
        temperature=spec.temperature,
    )
    scan = spec.entry.build(chain)

    def body(carry: Any, xs: Any) -> tuple[Any, Any]:
        carry, seen = scan.body(carry, xs)
        return carry, (seen if return_trajectory else None)

    carry, ys = jax.lax.scan(body, scan.init, scan.xs)
    out = scan.result(carry).astype(dtype)
    if not return_trajectory:
        return out
    eval_sigmas = formulation.round_sigma(scan.eval_sigmas)
    return out, Trajectory(
        timesteps=jnp.asarray(formulation.time(eval_sigmas)),
        x_t=ys[0],
        x0_pred=ys[1],
        sigmas=jnp.asarray(eval_sigmas, dtype),
    )


def denoiser(
    spec: Any,
    model_fn: Callable[..., Array],
    formulation: Formulation,
    shape: tuple[int, ...],
    dtype: Any,
    *,
    labels: Array | None = None,
    guide_fn: Callable[..., Array] | None = None,
) -> Denoiser:
    """The `Denoiser` of `spec` (its clipping and guidance) for `model_fn` with `labels` bound
    and autoguidance's `guide_fn`, on batches of `shape`; ValueError as `guidance.bind`."""
    net, guided = guidance.bind(
        model_fn,
        labels,
        spec.guidance_scale,
        spec.num_classes,
        shape[0],
        guide_fn=guide_fn,
        interval=spec.guidance_interval,
    )
    return Denoiser(net, formulation, shape, spec.clip_x0, dtype, guidance=guided)


def evaluation_sigmas(spec: Any, formulation: Formulation) -> np.ndarray:
    """float64 (K,): the level of each of the sampler's K model evaluations (rounded onto a
    discrete model's levels), from its scan built on a stand-in chain, traced abstractly:
    nothing runs."""
    start = spec.start_sigma(formulation)
    sigmas = spec.grid(formulation, start)
    found: list[np.ndarray] = []

    def build(x: Array) -> Array:
        denoise = Denoiser(
            net=lambda x, t: x, formulation=formulation, shape=x.shape, clip_x0=False, dtype=x.dtype
        )
        noise = Noise(keys=jax.random.split(jax.random.key(0), 1), shape=(), dtype=x.dtype)
        chain = Chain(sigmas, x, denoise, noise, spec.options, spec.temperature)
        found.append(spec.entry.build(chain).eval_sigmas)
        return x

    jax.eval_shape(build, jax.ShapeDtypeStruct((1,), diffusion.float_dtype()))
    return np.asarray(formulation.round_sigma(found[0]), np.float64)


def prior_sigma(spec: Any, formulation: Formulation) -> float:
    """The level whose marginal the start noise stands for: a discrete model's top level, else
    the first of the spec's grid."""
    levels = formulation.levels
    return float(levels[-1]) if levels is not None else float(spec.grid(formulation)[0])


def _start(formulation: Formulation, sigma: float, x_init: Array | None, noise: Noise) -> Array:
    """x_vp at level sigma: x_init (own coordinates) rescaled, else the start noise."""
    scale = float(formulation.scale(sigma))
    if x_init is not None:
        x = jnp.asarray(x_init, noise.dtype)
        return x if scale == 1.0 else x / scale
    factor = formulation.start_std(sigma) / scale
    x = noise(0)
    return x if factor == 1.0 else x * factor


def _check_data_gaussian(data_gaussian: DataGaussian | None, shape: tuple[int, ...]) -> None:
    if data_gaussian is None:
        raise ValueError(
            "a Gaussian start needs data_gaussian, the data's Gaussian model "
            "(DataGaussian.fit(train images in [-1, 1]))"
        )
    dim = int(np.prod(shape[1:]))
    if np.shape(data_gaussian.mean) != (dim,):
        raise ValueError(
            f"data_gaussian has dimension {np.shape(data_gaussian.mean)}; samples of shape "
            f"{shape[1:]} need ({dim},)"
        )
