"""Image editing with a trained (unconditional or class-conditional) diffusion model.

    sdedit   SDEdit (Meng et al. 2022): noise the input to the level a fraction `strength` along
             the formulation's time axis (ddpm: t_s = round(strength * (T - 1)); flow: t =
             strength; edm: sigma = strength * sigma_max) with the forward process, then run
             any sampler from there down to clean data. Low strength keeps the input's layout
             and details, high strength keeps only its coarse structure.
    inpaint  RePaint (Lugmayr et al. 2022): regenerate the unknown pixels with the ancestral
             chain on the sampler's grid while, at every step, the known pixels are replaced
             by a fresh forward sample of the input; resampling ("jumps") re-noises the
             combined image a few steps and denoises it again, so the generated region
             harmonises with the known one.

Both work for every formulation (ddpm, edm, flow), through its denoiser and levels, in the
samplers' x_vp coordinates. Both are pure and jittable (pass the parameters as arguments of a
jitted function that builds `model_fn`, as for `samplers.sample`). Noise follows the
samplers' convention: sample i uses key_i = fold_in(rng, sample_ids[i]), so an edit depends
only on (rng, sample id, input, options), not on the batch it is computed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.formulations import Formulation, as_formulation, vp_alpha, vp_noise
from diffusion_jax.formulations.base import nearest_level
from diffusion_jax.samplers import ddpm
from diffusion_jax.samplers.base import Level
from diffusion_jax.samplers.driver import denoiser
from diffusion_jax.samplers.noise import Noise, resolve_sample_ids
from diffusion_jax.samplers.spec import SamplerSpec
from diffusion_jax.schedules import Schedule
from diffusion_jax.values import is_int, is_real

Array = jax.Array

# Named inpainting regions (the pixels that are regenerated); see `known_mask`.
MASKS = ("left_half", "right_half", "top_half", "bottom_half", "center")

# `samplers.run` arguments that sdedit sets itself.
_SDEDIT_OWNED = ("x_init", "start_timestep", "start_sigma", "return_trajectory", "shape")


def _check_images(x0: Any) -> tuple[int, ...]:
    shape = tuple(jnp.shape(x0))
    if len(shape) < 2 or not all(d >= 1 for d in shape):
        raise ValueError(f"x0 must be a batch of images (B, H, W, C); got shape {shape}")
    return shape


def sdedit_timestep(num_timesteps: int, strength: float) -> int:
    """The timestep t_s = round(strength * (T - 1)) SDEdit noises the input to (ddpm)."""
    _check_strength(strength)
    return round(float(strength) * (num_timesteps - 1))


def _check_strength(strength: Any) -> None:
    if not is_real(strength) or not 0.0 <= strength <= 1.0:
        raise ValueError(
            f"strength must be a number in [0, 1] (0 = input unchanged, 1 = start from "
            f"pure noise); got {strength!r}"
        )


def sdedit(
    model_fn: Callable[..., Array],
    process: Formulation | Schedule,
    x0: Array,
    rng: Array,
    *,
    strength: float,
    spec: SamplerSpec | None = None,
    prediction: str = "eps",
    learn_sigma: bool = False,
    sample_ids: Array | None = None,
    labels: Array | None = None,
    **choices: Any,
) -> Array:
    """SDEdit: edited images (B, H, W, C) from inputs x0 (B, H, W, C) in [-1, 1].

    The input is noised to sigma_s = `Formulation.fraction_sigma(strength)` (a ddpm model's
    level at t_s = `sdedit_timestep(T, strength)`) with noise from fold_in(key_i, 0) (the draw
    the samplers use for their start), then sampled from there with `spec` (or a spec from the
    flat `choices`: sampler, num_steps, eta, timestep_spacing, guidance_scale, ...), its grid
    spaced over [sigma_s, 0] and, for a discrete model, at most as many levels as lie there.
    strength = 0 returns x0 itself. process: a formulation, or a schedule with `prediction`
    and `learn_sigma` (the ddpm formulation).
    Returns JAX's default float dtype. Raises ValueError for bad options, before tracing.
    """
    shape = _check_images(x0)
    owned = sorted(set(choices) & set(_SDEDIT_OWNED))
    if owned:
        raise ValueError(f"sdedit sets {owned} itself; remove them from the sampler options")
    formulation = as_formulation(process, prediction, learn_sigma)
    spec = (spec or SamplerSpec()).choose(**choices)
    _check_strength(strength)
    # Validate the sampler options here too, so strength 0 does not hide a bad option.
    spec.validate(formulation)
    sigma_s = formulation.fraction_sigma(strength, spec.sigma_max)
    dtype = diffusion.float_dtype()
    x0 = jnp.asarray(x0, dtype)
    ids = resolve_sample_ids(sample_ids, shape[0])
    if sigma_s == 0.0:
        return x0
    levels = formulation.levels
    if levels is not None:
        available = int(nearest_level(levels, np.asarray([sigma_s]))[0]) + 1
        spec = spec.replace(num_steps=min(spec.num_steps, available))
    noise = Noise.for_samples(rng, ids, shape, dtype)(0)
    x_vp = vp_alpha(sigma_s) * x0 + vp_noise(sigma_s) * noise
    x_start = (float(formulation.scale(sigma_s)) * x_vp).astype(dtype)
    return jnp.asarray(
        spec.sample(
            model_fn,
            formulation,
            shape,
            rng,
            sample_ids=ids,
            labels=labels,
            x_init=x_start,
            start_sigma=sigma_s,
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
    process: Formulation | Schedule,
    x0: Array,
    mask: Array,
    rng: Array,
    *,
    resample_steps: int = 10,
    jump_length: int = 1,
    spec: SamplerSpec | None = None,
    prediction: str = "eps",
    learn_sigma: bool = False,
    labels: Array | None = None,
    sample_ids: Array | None = None,
    **choices: Any,
) -> Array:
    """RePaint inpainting: (B, H, W, C) images equal to x0 where mask = 1, generated elsewhere.

    x0: (B, H, W, C) in [-1, 1]; mask: bool or float (B, H, W, 1) or (B, H, W, C), 1 = known
    (kept) pixel, 0 = regenerate (values between blend the two). The chain is the ancestral
    ('ddpm' sampler) one on the N = num_steps levels of the spec's grid (`spec`, or one from
    the flat `choices`: num_steps, variance, clip_x0, temperature, timestep_spacing,
    guidance_scale, num_classes; the spec's sampler is not used), read as a
    variance-preserving chain ab_k = 1 / (1 + sigma_k^2), walked as `repaint_schedule(N,
    resample_steps, jump_length)`: each move re-noises x with q(x_k | x_e) when it jumps back,
    then takes the reverse step x_unknown ~ p(x_{k+1} | x) (posterior mean of the clipped x0
    prediction, the spec's `variance`, noise scaled by its temperature), draws x_known ~
    q(x_{k+1} | x0) and sets x = mask * x_known + (1 - mask) * x_unknown. One lax.scan of M
    model evaluations (M ~ N * resample_steps). The known pixels of the output are x0
    exactly. process: a formulation, or a schedule with `prediction` and `learn_sigma`.
    Noise of sample i: fold_in(key_i, 0) for the start, fold_in(key_i, 1) for the first known
    draw, fold_in(key_i, 3m + 2 .. 3m + 4) for the jump, reverse and known noise of move m.
    Returns JAX's default float dtype. Raises ValueError for bad options, before tracing.
    """
    shape = _check_images(x0)
    batch = shape[0]
    formulation = as_formulation(process, prediction, learn_sigma)
    spec = (spec or SamplerSpec(sampler="ddpm")).choose(sampler="ddpm", **choices)
    spec.validate(formulation)
    _check_mask(mask, shape)
    num_steps = spec.num_steps
    step, jump_from = repaint_schedule(num_steps, resample_steps, jump_length)
    ids = resolve_sample_ids(sample_ids, batch)
    variance, temperature = spec.options.variance, spec.temperature

    # Per-move coefficients in float64 numpy; state N (the output) has ab = 1. The reverse
    # step k -> k + 1 is the ddpm sampler's on the same chain.
    sigmas = formulation.round_sigma(spec.grid(formulation))
    ab_chain = ddpm.chain_alphas_cumprod(sigmas)
    ab_states = np.concatenate([ab_chain, [1.0]])
    ab_next, ab_jump = ab_states[step + 1], ab_states[jump_from]
    # q(x_k | x_e) = N(sqrt(r) x, (1 - r) I); r = 1 where the move does not jump (also at
    # ab = 0, pure noise).
    with np.errstate(divide="ignore", invalid="ignore"):
        jump_ratio = np.where(step == jump_from, 1.0, ab_states[step] / ab_jump)
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
    denoise = denoiser(spec, model_fn, formulation, shape, dtype, labels=labels)

    def bcast(c: Array) -> Array:
        return c.reshape((1,) * len(shape))

    def body(x: Array, xs: tuple[Any, ...]) -> tuple[Array, None]:
        m, level, a_jump, s_jump, a0, at, s, lo, hi, a_known, s_known = xs
        x = bcast(a_jump) * x + bcast(s_jump) * normal(3 * m + 2)
        unknown, _ = ddpm.reverse_step(
            denoise,
            x,
            level,
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
    levels = Level.at(formulation, sigmas[step], denoise.interval)
    coefs = tuple(jnp.asarray(c, dtype) for c in per_move)
    out, _ = jax.lax.scan(body, x_start.astype(dtype), (moves, levels, *coefs))
    # Known pixels exactly as given (the blend above is exact only where the mask is 1.0 and
    # the generated values are finite).
    return jnp.where(keep >= 1.0, x0, out)
