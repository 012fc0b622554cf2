"""Image editing with a trained (unconditional or class-conditional) diffusion model.

    sdedit   SDEdit (Meng et al. 2022): noise the input to t_s = round(strength * (T - 1)) with
             q(x_t | x_0), then run any sampler from t_s down to 0. Low strength keeps the
             input's layout and details, high strength keeps only its coarse structure.
    inpaint  RePaint (Lugmayr et al. 2022): regenerate the unknown pixels with the ancestral
             (DDPM) chain while, at every step, the known pixels are replaced by a fresh sample
             of q(x_t | x_0) of the input; resampling ("jumps") re-noises the combined image a
             few steps and denoises it again, so the generated region harmonises with the
             known one.

Both are pure and jittable (pass the parameters as arguments of a jitted function that builds
`model_fn`, as for `samplers.sample`); string and integer options are static. Noise follows the
samplers' convention: sample i uses key_i = fold_in(rng, sample_ids[i]), so an edit depends
only on (rng, sample id, input, options), not on the batch it is computed in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, samplers
from diffusion_jax.guidance import conditioned_model
from diffusion_jax.samplers import ddpm
from diffusion_jax.samplers.denoise import Denoiser
from diffusion_jax.samplers.noise import Noise, resolve_sample_ids
from diffusion_jax.schedules import Schedule
from diffusion_jax.values import is_int, is_real

Array = jax.Array

# Named inpainting regions (the pixels that are regenerated); see `known_mask`.
MASKS = ("left_half", "right_half", "top_half", "bottom_half", "center")

# `samplers.sample` arguments that sdedit sets itself.
_SDEDIT_OWNED = ("x_init", "start_timestep", "return_trajectory", "shape")
# The sampler options `samplers.validate_sampler_args` checks besides those sdedit names.
_VALIDATED = ("timestep_spacing", *(f.name for f in dataclasses.fields(samplers.SamplerOptions)))


def _check_images(x0: Any) -> tuple[int, ...]:
    shape = tuple(jnp.shape(x0))
    if len(shape) < 2 or not all(d >= 1 for d in shape):
        raise ValueError(f"x0 must be a batch of images (B, H, W, C); got shape {shape}")
    return shape


def sdedit_timestep(num_timesteps: int, strength: float) -> int:
    """The timestep t_s = round(strength * (T - 1)) SDEdit noises the input to."""
    if not is_real(strength) or not 0.0 <= strength <= 1.0:
        raise ValueError(
            f"strength must be a number in [0, 1] (0 = input unchanged, 1 = start from "
            f"t = T-1); got {strength!r}"
        )
    return round(float(strength) * (num_timesteps - 1))


def sdedit(
    model_fn: Callable[..., Array],
    sch: Schedule,
    x0: Array,
    rng: Array,
    *,
    strength: float,
    sampler: str = "ddim",
    num_steps: int = 50,
    prediction: str = "eps",
    sample_ids: Array | None = None,
    labels: Array | None = None,
    guidance_scale: Any = 1.0,
    num_classes: int | None = None,
    **sampler_options: Any,
) -> Array:
    """SDEdit: edited images (B, H, W, C) from inputs x0 (B, H, W, C) in [-1, 1].

    x_ts = q_sample(x0, t_s) with t_s = `sdedit_timestep(T, strength)` and noise from
    fold_in(key_i, 0) (the draw `samplers.sample` would use for x_T), then
    `samplers.sample(..., x_init=x_ts, start_timestep=t_s, num_steps=min(num_steps, t_s + 1))`
    with the given sampler and `sampler_options` (eta, clip_x0, temperature, timestep_spacing,
    variance, lower_order_final). strength = 1 is plain sampling started from q_sample(x0, T-1);
    t_s = 0 (strength < 0.5 / (T - 1)) returns x0 itself. With an ODE sampler ('dpm_solver++',
    'heun') t_s must be >= 1 or 0 (they need two timesteps).
    Returns JAX's default float dtype. Raises ValueError for bad options, before tracing.
    """
    shape = _check_images(x0)
    owned = sorted(set(sampler_options) & set(_SDEDIT_OWNED))
    if owned:
        raise ValueError(f"sdedit sets {owned} itself; remove them from the sampler options")
    t_start = sdedit_timestep(sch.num_timesteps, strength)
    # Validate the sampler options here too, so t_s = 0 does not hide a bad option.
    samplers.validate_sampler_args(
        sampler=sampler,
        num_steps=num_steps,
        num_timesteps=sch.num_timesteps,
        prediction=prediction,
        **{k: v for k, v in sampler_options.items() if k in _VALIDATED},
    )
    dtype = diffusion.float_dtype()
    x0 = jnp.asarray(x0, dtype)
    ids = resolve_sample_ids(sample_ids, shape[0])
    if t_start == 0:
        return x0
    noise = Noise.for_samples(rng, ids, shape, dtype)(0)
    x_start = diffusion.q_sample(sch, x0, jnp.full((shape[0],), t_start, jnp.int32), noise)
    return jnp.asarray(
        samplers.sample(
            model_fn,
            sch,
            shape,
            rng,
            sampler=sampler,
            num_steps=min(num_steps, t_start + 1),
            prediction=prediction,
            sample_ids=ids,
            labels=labels,
            guidance_scale=guidance_scale,
            num_classes=num_classes,
            x_init=x_start,
            start_timestep=t_start,
            **sampler_options,
        )
    )


def known_mask(name: str, height: int, width: int) -> np.ndarray:
    """bool (H, W, 1) keep-mask for `inpaint`: True = known pixel, False = regenerated.

    `name` names the region to regenerate: 'left_half' | 'right_half' | 'top_half' |
    'bottom_half' | 'center' (the central square of half the height and width).
    """
    if name not in MASKS:
        raise ValueError(f"unknown mask {name!r}; use one of {MASKS}")
    if not (is_int(height) and is_int(width) and height >= 1 and width >= 1):
        raise ValueError(f"height and width must be positive ints; got {height!r}, {width!r}")
    regen = np.zeros((height, width, 1), bool)
    h2, w2 = height // 2, width // 2
    if name == "left_half":
        regen[:, :w2] = True
    elif name == "right_half":
        regen[:, w2:] = True
    elif name == "top_half":
        regen[:h2] = True
    elif name == "bottom_half":
        regen[h2:] = True
    else:  # center
        top, left = height // 4, width // 4
        regen[top : top + max(h2, 1), left : left + max(w2, 1)] = True
    return ~regen


def repaint_schedule(
    num_steps: int, resample_steps: int = 10, jump_length: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """RePaint's walk over the N = num_steps states of the (respaced) chain: (step, jump_from).

    State k < N is x at the k-th sampler timestep tau_k (tau_0 = T - 1 > ... > tau_{N-1} = 0);
    state N is the output. Each of the M entries is one model evaluation: first re-noise from
    state jump_from[m] to state step[m] with q (no-op when equal), then take the reverse step
    step[m] -> step[m] + 1. After reaching state e in {N-1, N-1-j, N-1-2j, ...} (e >= 1, j =
    jump_length), the walk jumps back to max(e - j, 0) and denoises again, resample_steps - 1
    times (U in the paper); the output state N itself is never re-noised. Both int64 (M,), with
    M = N + (U - 1) * (N - 1) for j = 1.
    """
    for key, value, low in (
        ("num_steps", num_steps, 1),
        ("resample_steps", resample_steps, 1),
        ("jump_length", jump_length, 1),
    ):
        if not is_int(value) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}; got {value!r}")
    steps: list[int] = []
    jumps: list[int] = []
    for end in range(1, num_steps + 1):
        steps.append(end - 1)
        jumps.append(end - 1)
        if end < num_steps and (num_steps - 1 - end) % jump_length == 0:
            start = max(end - jump_length, 0)
            for _ in range(resample_steps - 1):
                for k in range(start, end):
                    steps.append(k)
                    jumps.append(end if k == start else k)
    return np.asarray(steps, np.int64), np.asarray(jumps, np.int64)


def _check_mask(mask: Any, shape: tuple[int, ...]) -> None:
    mask_shape = tuple(jnp.shape(mask))
    ok = len(mask_shape) == len(shape) and all(
        m in (1, d) for m, d in zip(mask_shape, shape, strict=True)
    )
    if not ok or mask_shape[1:-1] != shape[1:-1]:
        raise ValueError(
            f"mask must have shape (B, H, W, 1) or (B, H, W, C) matching x0 {shape} "
            f"(1 = known pixel); got {mask_shape}"
        )
    try:
        values = np.asarray(mask, np.float64)
    except jax.errors.TracerArrayConversionError:
        return  # traced: values cannot be checked here
    if values.size and not (values.min() >= 0.0 and values.max() <= 1.0):
        raise ValueError("mask values must lie in [0, 1] (1 = known pixel, 0 = regenerate)")


def inpaint(
    model_fn: Callable[..., Array],
    sch: Schedule,
    x0: Array,
    mask: Array,
    rng: Array,
    *,
    num_steps: int = 50,
    resample_steps: int = 10,
    jump_length: int = 1,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
    temperature: Any = 1.0,
    timestep_spacing: str = "linspace",
    labels: Array | None = None,
    guidance_scale: Any = 1.0,
    num_classes: int | None = None,
    sample_ids: Array | None = None,
    learn_sigma: bool = False,
) -> Array:
    """RePaint inpainting: (B, H, W, C) images equal to x0 where mask = 1, generated elsewhere.

    x0: (B, H, W, C) in [-1, 1]; mask: bool or float (B, H, W, 1) or (B, H, W, C), 1 = known
    (kept) pixel, 0 = regenerate (values between blend the two). The chain is the ancestral
    (DDPM) one on the N = num_steps timesteps of `samplers.get_timesteps(T, N,
    timestep_spacing)` (respaced beta'_k = 1 - ab[tau_k] / ab[tau_{k+1}]; all T steps when
    N = T), walked as `repaint_schedule(N, resample_steps, jump_length)`: each move re-noises
    x with q(x_{tau_k} | x_{tau_e}) when it jumps back, then takes the reverse step
    x_unknown ~ p(x_{tau_{k+1}} | x) (posterior mean of the clipped x0 prediction, `variance`
    'fixed_small' | 'fixed_large' | 'learned_range', noise scaled by `temperature`), draws x_known ~
    q(x_{tau_{k+1}} | x0) and sets x = mask * x_known + (1 - mask) * x_unknown. One lax.scan
    of M model evaluations (M ~ N * resample_steps). The known pixels of the output are x0
    exactly. labels / guidance_scale / num_classes / sample_ids / learn_sigma as in
    `samplers.sample` ('learned_range' interpolates between the respaced chain's clipped
    posterior variance and beta'_k, as the ddpm sampler does).
    Noise of sample i: fold_in(key_i, 0) for x_T, fold_in(key_i, 1) for the first known draw,
    fold_in(key_i, 3m + 2 .. 3m + 4) for the jump, reverse and known noise of move m.
    The schedule must be concrete (numpy): the walk's coefficients are computed before tracing.
    Returns JAX's default float dtype. Raises ValueError for bad options, before tracing.
    """
    shape = _check_images(x0)
    batch = shape[0]
    samplers.validate_sampler_args(
        sampler="ddpm",
        num_steps=num_steps,
        num_timesteps=sch.num_timesteps,
        prediction=prediction,
        timestep_spacing=timestep_spacing,
        variance=variance,
        temperature=temperature,
        learn_sigma=learn_sigma,
    )
    _check_mask(mask, shape)
    step, jump_from = repaint_schedule(num_steps, resample_steps, jump_length)
    net = conditioned_model(model_fn, labels, guidance_scale, num_classes, batch)
    ids = resolve_sample_ids(sample_ids, batch)

    # Per-move coefficients in float64 numpy; state N (the output) has ab = 1. The reverse
    # step k -> k + 1 is the ddpm sampler's on the same chain.
    timesteps = samplers.get_timesteps(sch.num_timesteps, num_steps, timestep_spacing)
    ab_chain = np.asarray(sch.alphas_cumprod, np.float64)[timesteps]
    ab_states = np.concatenate([ab_chain, [1.0]])
    ab_next, ab_jump = ab_states[step + 1], ab_states[jump_from]
    jump_ratio = ab_states[step] / ab_jump  # q(x_{tau_k} | x_{tau_e}) = N(sqrt(r) x, (1 - r) I)
    reverse = (
        *ddpm.posterior_coefficients(ab_chain, variance),
        *ddpm.learned_range_bounds(ab_chain),
    )
    per_move = (
        np.sqrt(jump_ratio),
        np.sqrt(1.0 - jump_ratio),
        *(c[step] for c in reverse),
        np.sqrt(ab_next),
        np.sqrt(1.0 - ab_next),
    )

    dtype = diffusion.float_dtype()
    x0 = jnp.asarray(x0, dtype)
    keep = jnp.broadcast_to(jnp.asarray(mask, dtype), shape)
    normal = Noise.for_samples(rng, ids, shape, dtype)
    denoise = Denoiser(
        net=net,
        sch=sch,
        shape=shape,
        prediction=prediction,
        clip_x0=clip_x0,
        learn_sigma=learn_sigma,
        dtype=dtype,
    )

    def bcast(c: Array) -> Array:
        return c.reshape((1,) * len(shape))

    def body(x: Array, xs: tuple[Array, ...]) -> tuple[Array, None]:
        m, t_step, a_jump, s_jump, a0, at, s, lo, hi, a_known, s_known = xs
        x = bcast(a_jump) * x + bcast(s_jump) * normal(3 * m + 2)
        unknown, _ = ddpm.reverse_step(
            denoise,
            x,
            t_step,
            (bcast(a0), bcast(at), bcast(s), bcast(lo), bcast(hi)),
            normal(3 * m + 3),
            learned=variance == "learned_range",
            temperature=temperature,
        )
        known = bcast(a_known) * x0 + bcast(s_known) * normal(3 * m + 4)
        return (keep * known + (1.0 - keep) * unknown).astype(dtype), None

    a_start = np.sqrt(ab_states[0])
    x_start = normal(0)
    x_start = keep * (a_start * x0 + np.sqrt(1.0 - a_start**2) * normal(1)) + (1.0 - keep) * x_start
    moves = jnp.arange(step.shape[0], dtype=jnp.int32)
    t_moves = jnp.asarray(timesteps[step], jnp.int32)
    coefs = tuple(jnp.asarray(c, dtype) for c in per_move)
    out, _ = jax.lax.scan(body, x_start.astype(dtype), (moves, t_moves, *coefs))
    # Known pixels exactly as given (the blend above is exact only where the mask is 1.0 and
    # the generated values are finite).
    return jnp.where(keep >= 1.0, x0, out)
