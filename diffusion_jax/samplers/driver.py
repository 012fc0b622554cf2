"""`sample`: checks the arguments, builds the model, noise and timesteps every sampler shares,
looks the sampler up in the registry and runs its scan."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, edm
from diffusion_jax.data_gaussian import DataGaussian
from diffusion_jax.guidance import conditioned_model
from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import Chain
from diffusion_jax.samplers.checks import check_gaussian_start_steps, validate_sampler_args
from diffusion_jax.samplers.denoise import Denoiser, EDMDenoiser
from diffusion_jax.samplers.noise import Noise, resolve_sample_ids
from diffusion_jax.samplers.spacing import SIGMA_SPACINGS, get_timesteps
from diffusion_jax.schedules import Schedule
from diffusion_jax.values import is_int

Array = jax.Array


class Trajectory(NamedTuple):
    """What the model saw at each of the K evaluations of a sampler (K = N, or 2N - 1 for heun:
    its `num_evaluations(N)`).

    timesteps: int32 (K,); x_t: (K, B, ...) model inputs; x0_pred: (K, B, ...) x0 predictions
    (after clipping).
    """

    timesteps: Array
    x_t: Array
    x0_pred: Array


def sample(
    model_fn: Callable[..., Array],
    sch: Schedule | edm.EDM,
    shape: tuple[int, ...],
    rng: Array,
    *,
    sampler: str = "ddim",
    num_steps: int = 50,
    eta: float = 0.0,
    prediction: str = "eps",
    clip_x0: bool = True,
    temperature: Any = 1.0,
    timestep_spacing: str = "linspace",
    variance: str = "fixed_small",
    labels: Array | None = None,
    guidance_scale: Any = 1.0,
    num_classes: int | None = None,
    sample_ids: Array | None = None,
    x_init: Array | None = None,
    return_trajectory: bool = False,
    lower_order_final: bool = True,
    start_timestep: int | None = None,
    learn_sigma: bool = False,
    sigma_max: float = edm.SIGMA_MAX,
    rho: float = edm.RHO,
    gaussian_start_t: int = 0,
    data_gaussian: DataGaussian | None = None,
    sigma_min: float = edm.SIGMA_MIN,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = float("inf"),
    s_noise: float = 1.0,
) -> Any:
    """Draw samples (B, ...) = `shape` from the model; see the package docstring.

    model_fn(x_t (B, ...), t int32 (B,)) -> output of type `prediction`; with `labels` (B,) int
    it is called as model_fn(x_t, t, labels). guidance_scale != 1 applies classifier-free
    guidance with the null label `num_classes` (then required); a scalar or (B,).
    clip_x0 clips every x0 prediction to [-1, 1]. temperature scales the noise injected by
    ddpm and ddim with eta > 0 (not x_T). variance: ddpm only; 'learned_range' needs
    learn_sigma and interpolates each step's log-variance between the respaced chain's clipped
    posterior variance and beta'_k (Improved DDPM). eta: ddim only.
    learn_sigma: model_fn returns (B, ..., 2C), the prediction then the variance values
    (`diffusion.split_learned_variance`); every sampler uses the first C channels, ddpm with
    'learned_range' also the last C (with guidance, their guided combination).
    sample_ids: (B,) int, default arange(B); see the package docstring.
    x_init: (B, ...) start at t = timesteps[0] instead of x_T ~ N(0, I) (e.g. to interpolate
    between starting points of the deterministic samplers); injected noise is unchanged.
    lower_order_final: dpm_solver++ only; True takes the last update (onto t = 0) at first
    order (the DDIM step), much more accurate with few steps; False is pure 2M (second order
    on every step but the first). With num_steps = 3 and True, dpm_solver++ equals ddim.
    start_timestep: start the chain at this t (0..T-1) instead of T - 1, with the timesteps
    spaced over [start_timestep, 0] (SDEdit: pass x_init = q_sample(x0, start_timestep));
    needs num_steps <= start_timestep + 1.
    sigma_max, rho: the 'karras' and 'logsnr' spacings' largest sigma and Karras' rho
    (`get_timesteps`).
    gaussian_start_t: > 0 moves x_T (x_init if given) to t = gaussian_start_t with the exact
    probability-flow map of `data_gaussian` (the data's Gaussian model, `DataGaussian`) and
    runs the sampler from there, its timesteps spaced over [gaussian_start_t, 0]: the network
    is never evaluated above gaussian_start_t. 0 = off.
    EDM formulation: with `sch` an `edm.EDM`, model_fn is the network F(x_in, time[, labels])
    (`edm.EDM.denoise` preconditions it) and the sampler one registered for 'edm' (`edm_heun`,
    `edm_euler`, `edm_stochastic`, `edm_dpm_solver++`, ...; `edm_samplers`). It visits the N
    noise levels of timestep_spacing 'karras' (`edm.karras_sigmas(N, sigma_min, sigma_max,
    rho)`) or 'logsnr' (geometric), from x = sigma_max * N(0, I) (x_init if given), and returns
    the x0 prediction at sigma_min. s_churn, s_min, s_max, s_noise: edm_stochastic (EDM Alg. 2).
    A trajectory's timesteps are then the sigmas evaluated (float). start_timestep and
    gaussian_start_t are for the ddpm formulation.
    Static (Python) arguments: shape, sampler, num_steps, eta, prediction, clip_x0,
    timestep_spacing, variance, num_classes, return_trajectory, lower_order_final,
    start_timestep, learn_sigma, sigma_max, rho, gaussian_start_t, sigma_min, s_churn, s_min,
    s_max, s_noise.

    Returns x0 samples (B, ...) in JAX's default float dtype (float32 unless x64 is enabled),
    and with return_trajectory also a `Trajectory`.
    Raises ValueError (before tracing the model) for bad options, naming the allowed values.
    """
    is_edm = isinstance(sch, edm.EDM)
    num_timesteps = sch.num_timesteps if isinstance(sch, Schedule) else 0
    options = validate_sampler_args(
        sampler=sampler,
        num_steps=num_steps,
        num_timesteps=num_timesteps,
        eta=eta,
        prediction=prediction,
        timestep_spacing=timestep_spacing,
        variance=variance,
        temperature=temperature,
        learn_sigma=learn_sigma,
        lower_order_final=lower_order_final,
        sigma_max=sigma_max,
        rho=rho,
        gaussian_start_t=gaussian_start_t,
        sigma_min=sigma_min,
        s_churn=s_churn,
        s_min=s_min,
        s_max=s_max,
        s_noise=s_noise,
        formulation="edm" if is_edm else "ddpm",
    )
    shape = tuple(shape)
    if not shape or not all(is_int(d) and d >= 1 for d in shape):
        raise ValueError(f"shape must be a tuple of positive ints (B, ...); got {shape!r}")
    batch = shape[0]
    net = conditioned_model(model_fn, labels, guidance_scale, num_classes, batch)
    sample_ids = resolve_sample_ids(sample_ids, batch)
    if x_init is not None and jnp.shape(x_init) != shape:
        raise ValueError(f"x_init must have shape {shape}; got {jnp.shape(x_init)}")
    if is_edm:
        assert isinstance(sch, edm.EDM)
        if start_timestep is not None:
            raise ValueError("start_timestep is for the ddpm formulation's samplers")
        sigma_grid = (
            edm.karras_sigmas(num_steps, sigma_min, sigma_max, rho)
            if timestep_spacing == "karras"
            else edm.log_sigmas(num_steps, sigma_min, sigma_max)
        )
        dtype = diffusion.float_dtype()
        noise = Noise.for_samples(rng, sample_ids, shape, dtype)
        x_start = sigma_grid[0] * noise(0) if x_init is None else jnp.asarray(x_init, dtype)
        edm_chain = Chain(
            timesteps=np.arange(num_steps - 1, -1, -1, dtype=np.int64),
            alphas_cumprod=1.0 / (1.0 + sigma_grid**2),
            x_init=x_start.astype(dtype),
            denoise=EDMDenoiser(net=net, process=sch, shape=shape, clip_x0=clip_x0, dtype=dtype),
            noise=noise,
            options=options,
            sigmas=sigma_grid,
        )
        return _run_scan(sampler, edm_chain, return_trajectory, int_timesteps=False)
    assert isinstance(sch, Schedule)
    if start_timestep is not None:
        if not is_int(start_timestep) or not 0 <= start_timestep < num_timesteps:
            raise ValueError(
                f"start_timestep must be an integer in [0, {num_timesteps - 1}]; "
                f"got {start_timestep!r}"
            )
        if num_steps > start_timestep + 1:
            raise ValueError(
                f"num_steps={num_steps} exceeds the {start_timestep + 1} timesteps from "
                f"start_timestep={start_timestep} to 0; lower num_steps"
            )

    if gaussian_start_t:
        _check_gaussian_start(gaussian_start_t, num_steps, start_timestep, data_gaussian, shape)
        start_timestep = gaussian_start_t

    dtype = diffusion.float_dtype()
    # A chain started at t_start is spaced like a schedule of t_start + 1 steps.
    chain_length = num_timesteps if start_timestep is None else start_timestep + 1
    timesteps = get_timesteps(
        chain_length,
        num_steps,
        timestep_spacing,
        alphas_cumprod=_concrete_alphas_cumprod(sch, timestep_spacing, chain_length),
        sigma_max=sigma_max,
        rho=rho,
    )
    noise = Noise.for_samples(rng, sample_ids, shape, dtype)
    x_start = noise(0) if x_init is None else jnp.asarray(x_init, dtype)
    if gaussian_start_t:
        assert data_gaussian is not None
        ab = sch.alphas_cumprod
        x_start = data_gaussian.flow(x_start, ab[num_timesteps - 1], ab[gaussian_start_t])
    chain = Chain(
        timesteps=timesteps,
        # float64 numpy for a schedule closed over; a jax array when the schedule is traced.
        alphas_cumprod=sch.alphas_cumprod[timesteps],
        x_init=x_start.astype(dtype),
        denoise=Denoiser(
            net=net,
            sch=sch,
            shape=shape,
            prediction=prediction,
            clip_x0=clip_x0,
            learn_sigma=learn_sigma,
            dtype=dtype,
        ),
        noise=noise,
        options=options,
    )
    return _run_scan(sampler, chain, return_trajectory, int_timesteps=True)


def _run_scan(sampler: str, chain: Chain, return_trajectory: bool, *, int_timesteps: bool) -> Any:
    """Build the sampler's scan from `chain` and run it: the samples, and the `Trajectory`
    with return_trajectory (its timesteps int32, or the edm chain's float sigmas)."""
    dtype = diffusion.float_dtype()
    scan = registry.get_sampler(sampler).build(chain)

    def body(carry: Any, xs: Any) -> tuple[Any, Any]:
        carry, seen = scan.body(carry, xs)
        return carry, (seen if return_trajectory else None)

    carry, ys = jax.lax.scan(body, scan.init, scan.xs)
    out = scan.result(carry).astype(dtype)
    if return_trajectory:
        eval_ts = jnp.asarray(scan.eval_timesteps, jnp.int32 if int_timesteps else dtype)
        return out, Trajectory(timesteps=eval_ts, x_t=ys[0], x0_pred=ys[1])
    return out


def _concrete_alphas_cumprod(sch: Schedule, spacing: str, length: int) -> np.ndarray | None:
    """The schedule's first `length` alphas_cumprod as numpy for the sigma spacings (None for
    the others, which need only T); ValueError if the schedule is traced."""
    if spacing not in SIGMA_SPACINGS:
        return None
    try:
        return np.asarray(sch.alphas_cumprod, np.float64)[:length]
    except jax.errors.TracerArrayConversionError:
        raise ValueError(
            f"timestep_spacing={spacing!r} places the timesteps by the schedule's values: "
            "close over the schedule instead of passing it to the jitted function"
        ) from None


def _check_gaussian_start(
    gaussian_start_t: int,
    num_steps: int,
    start_timestep: int | None,
    data_gaussian: DataGaussian | None,
    shape: tuple[int, ...],
) -> None:
    if start_timestep is not None:
        raise ValueError(
            "gaussian_start_t and start_timestep both choose where the chain starts; pass one"
        )
    if data_gaussian is None:
        raise ValueError(
            "gaussian_start_t > 0 needs data_gaussian, the data's Gaussian model "
            "(DataGaussian.fit(train images in [-1, 1]))"
        )
    dim = int(np.prod(shape[1:]))
    if np.shape(data_gaussian.mean) != (dim,):
        raise ValueError(
            f"data_gaussian has dimension {np.shape(data_gaussian.mean)}; samples of shape "
            f"{shape[1:]} need ({dim},)"
        )
    check_gaussian_start_steps(num_steps, gaussian_start_t)
