"""Pictures of the diffusion process: forward-noising strips, reverse trajectories and GIFs.

    forward_strip(sch, x0, timesteps, rng)       q(x_t | x0) at chosen t, one row per image
    forward_strip_levels(formulation, x0, sigmas, rng)   the same at levels of any formulation
    reverse_frames(model_fn, process, shape, rng)   x_t and the x0 prediction at every model call
    trajectory_strip(frames)                     rows x_t / x0_pred at evenly spaced calls
    gif_frames(frames) + save_gif(path, ...)     the reverse process as an animated GIF

Images are float in [-1, 1] until they are drawn; drawn images are uint8 (values outside
[-1, 1], e.g. noisy x_t, are clipped).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import IO, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffusion_jax import images, samplers
from diffusion_jax.formulations import DDPM, Formulation, vp_alpha, vp_noise
from diffusion_jax.schedules import Schedule

Array = jax.Array


class ReverseFrames(NamedTuple):
    """A reverse process recorded at its K model evaluations (numpy float32).

    timesteps: (K,) the network's time inputs (int32 timesteps for the ddpm formulation);
    x_t: (K, B, H, W, C) model inputs; x0_pred: (K, B, H, W, C) x0 predictions; samples:
    (B, H, W, C) the sampler's output.
    """

    timesteps: np.ndarray
    x_t: np.ndarray
    x0_pred: np.ndarray
    samples: np.ndarray


def evenly_spaced(count: int, num: int) -> np.ndarray:
    """int64 (min(num, count),) indices into range(count), first and last included."""
    if not (isinstance(count, numbers.Integral) and count >= 1):
        raise ValueError(f"count must be a positive int; got {count!r}")
    if not (isinstance(num, numbers.Integral) and num >= 1):
        raise ValueError(f"num must be a positive int; got {num!r}")
    return np.unique(np.round(np.linspace(0, count - 1, min(num, count))).astype(np.int64))


def _image_batch(x0: Any) -> np.ndarray:
    """float32 (B, H, W, C) from an image (H, W, C) or a batch; ValueError otherwise."""
    x = np.asarray(x0, np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"x0 must be (H, W, C) or (B, H, W, C); got shape {x.shape}")
    return x


def forward_strip(
    sch: Schedule,
    x0: Any,
    timesteps: Sequence[int] | np.ndarray,
    rng: Array,
    *,
    padding: int = 1,
) -> np.ndarray:
    """uint8 strip of x_t ~ q(x_t | x0) at each of `timesteps` (one column each).

    x0: (H, W, C) or (B, H, W, C) in [-1, 1], one row per image. Image b uses one noise draw
    N(0, I) from fold_in(rng, b) for all its columns, so a row shows the same noise growing.
    Returns uint8 (R (H + p) + p, K (W + p) + p, C) with R = B rows, K = len(timesteps).
    """
    x = _image_batch(x0)
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer):
        raise ValueError(f"timesteps must be a non-empty 1-D sequence of ints; got {timesteps!r}")
    if ts.min() < 0 or ts.max() >= sch.num_timesteps:
        raise ValueError(
            f"timesteps must lie in [0, {sch.num_timesteps - 1}] (the schedule's T - 1); "
            f"got {ts.tolist()}"
        )
    levels = np.asarray(sch.alphas_cumprod, np.float64)
    sigmas = np.sqrt((1.0 - levels) / levels)[ts]
    return forward_strip_levels(DDPM(sch), x, sigmas, rng, padding=padding)


def forward_strip_levels(
    formulation: Formulation,
    x0: Any,
    sigmas: Sequence[float] | np.ndarray,
    rng: Array,
    *,
    padding: int = 1,
) -> np.ndarray:
    """uint8 strip of the formulation's forward process at each level of `sigmas` (one column
    each; 0 = the clean image, inf = pure noise), in its own coordinates (what its network
    sees). x0 and the noise as for `forward_strip`."""
    x = _image_batch(x0)
    sig = np.asarray(sigmas, np.float64)
    if sig.ndim != 1 or sig.size == 0 or np.any(np.isnan(sig)) or np.any(sig < 0):
        raise ValueError(f"sigmas must be a non-empty 1-D sequence of levels >= 0; got {sigmas!r}")
    batch, num_t = x.shape[0], sig.shape[0]
    noise = np.asarray(
        jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(rng, i), x.shape[1:]))(
            jnp.arange(batch)
        ),
        np.float64,
    )
    a, s = vp_alpha(sig), vp_noise(sig)
    scale = np.where(sig > 0, formulation.scale(np.where(sig > 0, sig, 1.0)), 1.0)
    shape = (1, num_t) + (1,) * (x.ndim - 1)
    x_t = scale.reshape(shape) * (
        a.reshape(shape) * x[:, None].astype(np.float64) + s.reshape(shape) * noise[:, None]
    )
    tiles = x_t.reshape(-1, *x.shape[1:]).astype(np.float32)
    return images.make_grid(images.to_uint8(tiles), ncols=num_t, padding=padding)


def reverse_frames(
    model_fn: Callable[..., Array],
    process: Formulation | Schedule,
    shape: tuple[int, ...],
    rng: Array,
    *,
    labels: Any = None,
    spec: samplers.SamplerSpec | None = None,
    **sampler_options: Any,
) -> ReverseFrames:
    """Run `spec` (or `samplers.sample`'s flat `sampler_options`: sampler, num_steps, eta,
    prediction, guidance_scale, num_classes, ...) with return_trajectory=True, jitted
    (model_fn, and the parameters it closes over, are compiled in, as in `Run.sample`).

    process: a formulation, or a schedule (the ddpm formulation with sampler_options'
    prediction). shape: (B, H, W, C); labels: (B,) int or None. K, the number of recorded model
    evaluations, is num_steps (2 num_steps - 1 for heun).
    """
    if "return_trajectory" in sampler_options:
        raise ValueError("reverse_frames sets return_trajectory itself; remove it")
    shape = tuple(shape)

    def run(rng: Array, labels: Array | None) -> tuple[Array, samplers.Trajectory]:
        if spec is not None:
            assert not isinstance(process, Schedule), "pass a formulation with a spec"
            return spec.sample(model_fn, process, shape, rng, labels=labels, return_trajectory=True)
        out, traj = samplers.sample(
            model_fn, process, shape, rng, labels=labels, return_trajectory=True, **sampler_options
        )
        return out, traj

    # Bad options raise while tracing, before anything is compiled.
    out, traj = jax.jit(run)(rng, None if labels is None else jnp.asarray(labels, jnp.int32))
    return ReverseFrames(
        timesteps=np.asarray(traj.timesteps),
        x_t=np.asarray(traj.x_t, np.float32),
        x0_pred=np.asarray(traj.x0_pred, np.float32),
        samples=np.asarray(out, np.float32),
    )


def trajectory_strip(
    frames: ReverseFrames, *, num_columns: int = 10, padding: int = 1
) -> np.ndarray:
    """uint8 image: for each sample b, a row of x_t and below it a row of the x0 prediction at
    `num_columns` evenly spaced model evaluations (first and last included).

    Returns uint8 (2B (H + p) + p, n (W + p) + p, C), n = min(num_columns, K).
    """
    cols = evenly_spaced(frames.x_t.shape[0], num_columns)
    # (K', B, ...) -> (B, 2, K', ...): the x_t row then the x0_pred row of each sample.
    pair = np.stack([frames.x_t[cols], frames.x0_pred[cols]], axis=0).transpose(2, 0, 1, 3, 4, 5)
    tiles = pair.reshape(-1, *frames.x_t.shape[2:])
    return images.make_grid(images.to_uint8(tiles), ncols=len(cols), padding=padding)


def gif_frames(frames: ReverseFrames, *, padding: int = 1) -> np.ndarray:
    """uint8 (K, 2 (H + p) + p, B (W + p) + p, C): frame k shows the B samples' x_t (top row)
    and x0 predictions (bottom row) at model evaluation k."""
    num_k, batch = frames.x_t.shape[:2]
    out = []
    for k in range(num_k):
        tiles = images.to_uint8(np.concatenate([frames.x_t[k], frames.x0_pred[k]]))
        out.append(images.make_grid(tiles, ncols=batch, padding=padding))
    return np.stack(out)


def save_gif(
    path: str | IO[bytes],
    frames: np.ndarray | Sequence[np.ndarray],
    *,
    scale: int | None = None,
    duration_ms: int = 100,
    last_frame_ms: int = 1500,
    loop: int = 0,
) -> None:
    """Write uint8 frames (F, H, W, C), C in {1, 3}, as an animated GIF of F frames to `path`
    (a file name or a binary file object).

    scale: nearest-neighbour enlargement (default: so the longer side is about 256 pixels, so
    8x8 digits stay visible); duration_ms per frame, last_frame_ms for the final one (to
    rest on the result); loop: 0 = forever. Pillow merges consecutive identical frames (adding
    their durations), so such frames count once.
    """
    stack = np.asarray(frames)
    if stack.ndim != 4 or stack.shape[-1] not in (1, 3) or stack.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8 (F, H, W, C) with C in (1, 3); got {stack.dtype} {stack.shape}"
        )
    if stack.shape[0] == 0:
        raise ValueError("frames is empty; pass at least one frame")
    if scale is None:
        scale = max(1, 256 // max(stack.shape[1:3]))
    if not (isinstance(scale, int) and scale >= 1):
        raise ValueError(f"scale must be a positive int; got {scale!r}")
    stack = stack.repeat(scale, axis=1).repeat(scale, axis=2)
    pil = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in stack]
    durations = [duration_ms] * (len(pil) - 1) + [last_frame_ms]
    pil[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=pil[1:],
        duration=durations,
        loop=loop,
        optimize=False,
    )
