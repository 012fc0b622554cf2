"""Samplers: ancestral DDPM, DDIM(eta), DPM-Solver++(2M) and Heun, each one `lax.scan`.

One entry point, `sample(model_fn, sch, shape, rng, ...)`. A sampler visits N = num_steps
integer timesteps tau_0 > tau_1 > ... > tau_{N-1} = 0 (`get_timesteps`) and evaluates the model
only there; the model appears once in the traced graph (one scan body), so compile time does
not grow with N. Per-step coefficients are computed in float64 numpy before tracing.

    ddpm          ancestral sampling on the respaced chain tau, beta'_k = 1 - ab[tau_k] /
                  ab[tau_{k+1}] (all T steps when N = T); variance 'fixed_small' | 'fixed_large'
                  | 'learned_range' (a learn_sigma model's own, interpolated on the respaced
                  chain as in Improved DDPM). N model evaluations.
    ddim          Song et al.; eta = 0 deterministic, eta = 1 is ancestral sampling (== ddpm
                  'fixed_small') on tau. N evaluations.
    dpm_solver++  Lu et al. 2022, 2M multistep with data (x0) prediction in lambda = log(a / sigma)
                  evaluated at the integer timesteps; first step first order. With
                  lower_order_final (default) the last update, onto t = 0, is first order too
                  (the DDIM step in data prediction), as in the DPM-Solver reference code
                  (which applies it below 10 steps) and diffusers (below 15 steps, or whenever
                  its last step goes to sigma = 0); here it applies for every N. N evaluations.
    heun          Karras et al. 2022 (EDM) 2nd-order Heun on the probability-flow ODE in
                  y = x / a, sigma = sigma_t / a_t; the step from sigma(tau_{N-1} = 0) to sigma = 0
                  is Euler. 2N - 1 evaluations.

The last step of every sampler returns the model's x0 prediction at t = 0 (DDIM's step to
ab = 1; for the ODE samplers the Euler step to sigma = 0, i.e. x0 = denoise(x at t = 0)).

Accuracy (benchmarks/sampler_gaussian_error.py, exact Gaussian model, linspace timesteps): ddim
is first order, heun and pure 2M dpm_solver++ (lower_order_final=False) second order in the
number of steps. With few steps the first / last intervals of uniform-in-t timesteps are long:
dpm_solver++'s last step spans a large log-SNR range (lambda(t = 0) ~ 4.6 for 'linear'), where
the 2M correction extrapolates the x0 predictions badly (worse than ddim at 11-21 steps).
lower_order_final avoids that: its error is below ddim's at every N benchmarked (about equal at
6 steps, 1.4-3x less at 11, 3-45x less at 21; 'linear' / 'cosine') and below pure 2M's from 11
steps on (2-56x less), though pure 2M is better at 6 steps on 'linear'. Its error changes sign
near 21-41 steps and its observed order at 81-321 steps is ~1.5-1.8. heun's first step starts
at sigma(T-1) (~157 for 'linear', ~2e4 for 'cosine', where heun needs ~80+ steps to be
accurate). Check the benchmark before choosing.

A learn_sigma model (output (B, ..., 2C), Improved DDPM) is used through its first C channels
by every sampler; only ddpm with variance='learned_range' reads the last C.

Noise: sample i uses key_i = fold_in(rng, sample_ids[i]); x_T ~ N(0, I) from fold_in(key_i, 0)
and the noise injected at step k from fold_in(key_i, k + 1). So sample i does not depend on the
batch it is drawn in, nor on how a run is split over devices.

To compile everything, jit a function that closes over `model_fn` and the schedule, passing
parameters as arguments:

    @jax.jit
    def generate(params, rng):
        model_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
        return samplers.sample(model_fn, sch, (16, 32, 32, 3), rng, sampler='ddim', num_steps=50)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.guidance import conditioned_model
from diffusion_jax.schedules import Schedule
from diffusion_jax.values import is_int, is_real

Array = jax.Array

SAMPLERS = ("ddpm", "ddim", "dpm_solver++", "heun")
ODE_SAMPLERS = ("dpm_solver++", "heun")  # integrate T-1 -> 0: need num_steps >= 2
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing", "quadratic")


class Trajectory(NamedTuple):
    """What the model saw at each of the K evaluations of a sampler (K = N, or 2N - 1 for heun).

    timesteps: int32 (K,); x_t: (K, B, ...) model inputs; x0_pred: (K, B, ...) x0 predictions
    (after clipping).
    """

    timesteps: Array
    x_t: Array
    x0_pred: Array


def validate_sampler_args(
    *,
    sampler: str,
    num_steps: int,
    num_timesteps: int,
    eta: float = 0.0,
    prediction: str = "eps",
    timestep_spacing: str = "linspace",
    variance: str = "fixed_small",
    temperature: Any = 1.0,
    learn_sigma: bool = False,
) -> None:
    """Raise ValueError naming the allowed values / the fix for any bad sampler option."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {SAMPLERS}")
    if prediction not in diffusion.PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; use one of {diffusion.PREDICTIONS}")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"unknown timestep_spacing {timestep_spacing!r}; use one of {TIMESTEP_SPACINGS}"
        )
    if variance not in diffusion.VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; use one of {diffusion.VARIANCES}")
    if variance == "learned_range" and not learn_sigma:
        raise ValueError(
            "variance='learned_range' needs a model that outputs its variance (learn_sigma=True, "
            "config model.learn_sigma=True); use 'fixed_small' or 'fixed_large' for this model"
        )
    if not is_int(num_timesteps) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1; got {num_timesteps!r}")
    if not is_int(num_steps) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must be an integer in [1, {num_timesteps}] (the schedule's T); "
            f"got {num_steps!r}"
        )
    if sampler in ODE_SAMPLERS and num_steps < 2:
        raise ValueError(
            f"sampler {sampler!r} integrates the ODE from t=T-1 to t=0 and needs num_steps >= 2 "
            f"(and a schedule with T >= 2); got num_steps={num_steps}"
        )
    if not is_real(eta) or not eta >= 0.0:
        raise ValueError(f"eta must be a number >= 0 (0 = deterministic DDIM); got {eta!r}")
    if is_real(temperature) and not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0; got {temperature!r}")


def validate_on_schedule(
    sch: Schedule, *, sampler: str, num_steps: int, eta: float, timestep_spacing: str = "linspace"
) -> None:
    """The checks that need the schedule's values (pure numpy, nothing traced): a DDIM `eta`
    whose noise would exceed 1 - alpha_bar on the chosen timesteps raises ValueError."""
    if sampler == "ddim" and eta > 0:
        timesteps = get_timesteps(sch.num_timesteps, num_steps, timestep_spacing)
        _ddim_coefficients(np.asarray(sch.alphas_cumprod)[timesteps], eta)


def _fix_strictly_decreasing(timesteps: np.ndarray, num_timesteps: int) -> np.ndarray:
    """Make rounded timesteps (N,) unique and strictly decreasing within [0, T-1], keeping the
    last at 0; a no-op on sequences that already are (N <= T guarantees a solution)."""
    asc = np.clip(timesteps[::-1].astype(np.int64), 0, num_timesteps - 1)
    for k in range(1, len(asc)):
        asc[k] = max(asc[k], asc[k - 1] + 1)
    asc[-1] = min(asc[-1], num_timesteps - 1)
    for k in range(len(asc) - 2, -1, -1):
        asc[k] = min(asc[k], asc[k + 1] - 1)
    return asc[::-1].copy()


def get_timesteps(num_timesteps: int, num_steps: int, spacing: str = "linspace") -> np.ndarray:
    """The N = num_steps integer timesteps a sampler visits: int64 (N,), strictly decreasing.

    Every spacing ends at t = 0 (for N >= 2); N = 1 gives [T - 1] (one jump from x_T to the
    x0 prediction). With T = num_timesteps:
      'linspace'  round(linspace(T - 1, 0, N)) (starts at T - 1)
      'leading'   k * (T // N) for k = N-1..0 (DDIM's 'uniform'; starts below T - 1)
      'trailing'  round(T - 1 - k * T / N) for k = 0..N-1, the last set to 0 (starts at T - 1)
      'quadratic' round((T - 1) * (k / (N - 1))^2) for k = N-1..0 (DDIM's 'quad', dense near 0)
    Collisions from rounding (quadratic with N close to T) are pushed apart.
    """
    validate_sampler_args(
        sampler="ddim",
        num_steps=num_steps,
        num_timesteps=num_timesteps,
        timestep_spacing=spacing,
    )
    t_max, n = num_timesteps - 1, num_steps
    if n == 1:
        return np.array([t_max], dtype=np.int64)
    ts: np.ndarray
    if spacing == "linspace":
        ts = np.round(np.linspace(t_max, 0.0, n))
    elif spacing == "leading":
        ts = np.arange(n - 1, -1, -1) * (num_timesteps // n)
    elif spacing == "trailing":
        ts = np.round(t_max - np.arange(n) * (num_timesteps / n))
        ts[-1] = 0
    else:  # quadratic
        ts = np.round(t_max * np.linspace(1.0, 0.0, n) ** 2)
    return _fix_strictly_decreasing(np.asarray(ts), num_timesteps)


def _xp(arr: Any) -> Any:
    return np if isinstance(arr, np.ndarray) else jnp


def _next_alphas_cumprod(ab: Any) -> Any:
    """ab at tau_{k+1} for each step k, with clean data (ab = 1) after the last step."""
    xp = _xp(ab)
    return xp.concatenate([ab[1:], xp.ones((1,), dtype=ab.dtype)])


def _ddpm_coefficients(ab: Any, variance: str) -> tuple[Any, Any, Any]:
    """Posterior coefficients (on x0, on x_t) and std of the respaced chain, each (N,).

    For 'learned_range' the std is that of 'fixed_small' (the sampler replaces it by the
    model's; see `_learned_range_bounds`) except for the noiseless last step.
    """
    xp = _xp(ab)
    ab_next = _next_alphas_cumprod(ab)
    beta = 1.0 - ab / ab_next  # respaced beta'_k
    c_x0 = beta * xp.sqrt(ab_next) / (1.0 - ab)
    c_xt = (1.0 - ab_next) * xp.sqrt(1.0 - beta) / (1.0 - ab)
    var = beta if variance == "fixed_large" else beta * (1.0 - ab_next) / (1.0 - ab)
    # No noise on the last step (into clean data): Ho et al.'s nonzero mask at t = 0.
    is_last = xp.arange(ab.shape[0]) == ab.shape[0] - 1
    std = xp.where(is_last, 0.0, xp.sqrt(var))
    return c_x0, c_xt, std


def _learned_range_bounds(ab: Any) -> tuple[Any, Any]:
    """(min, max) log-variance of 'learned_range' on the respaced chain, each (N,): the clipped
    log posterior variance and log beta'_k, as for a schedule built from the respaced betas
    (Improved DDPM). The last step's posterior variance is 0; its log is clipped to the step
    before's (to log beta' when N = 1), as `schedules` does at t = 0."""
    xp = _xp(ab)
    ab_next = _next_alphas_cumprod(ab)
    beta = 1.0 - ab / ab_next
    post_var = beta * (1.0 - ab_next) / (1.0 - ab)
    n = ab.shape[0]
    last = post_var[n - 2 : n - 1] if n > 1 else beta[-1:]
    min_log = xp.log(xp.concatenate([post_var[:-1], last]))
    return min_log, xp.log(beta)


def _ddim_coefficients(ab: Any, eta: float) -> tuple[Any, Any, Any]:
    """x_next = c_x0 x0 + c_eps eps + c_z z, each (N,); c_z = eta-scaled DDIM sigma."""
    xp = _xp(ab)
    ab_next = _next_alphas_cumprod(ab)
    sigma2 = eta**2 * (1.0 - ab_next) / (1.0 - ab) * (1.0 - ab / ab_next)
    c_eps2 = 1.0 - ab_next - sigma2
    if xp is np and np.any(c_eps2 < -1e-12):
        max_eta = float(np.sqrt(np.min((1.0 - ab) / (1.0 - ab / ab_next))))
        raise ValueError(
            f"eta={eta} makes the DDIM noise exceed 1 - alpha_bar on these timesteps; "
            f"use eta <= {max_eta:.4g}"
        )
    return xp.sqrt(ab_next), xp.sqrt(xp.maximum(c_eps2, 0.0)), xp.sqrt(sigma2)


def _dpm_solver_coefficients(ab: Any, lower_order_final: bool = True) -> tuple[Any, Any, Any]:
    """DPM-Solver++(2M): x_next = A x + B D_k + C D_{k-1}, each (N,), D = x0 predictions.

    Step k goes tau_k -> tau_{k+1} with h_k = lambda_{k+1} - lambda_k; the first step is first
    order (C = 0), and with lower_order_final so is the update onto tau_{N-1} = 0 (k = N-2);
    the last (k = N-1) returns D_{N-1}, the x0 prediction at t = 0.
    """
    xp = _xp(ab)
    alpha, sigma = xp.sqrt(ab), xp.sqrt(1.0 - ab)
    lam = xp.log(alpha) - xp.log(sigma)
    h = lam[1:] - lam[:-1]  # (N-1,), > 0
    phi = -alpha[1:] * xp.expm1(-h)  # alpha_{k+1} (1 - e^{-h_k})
    r = xp.concatenate([xp.ones((1,), dtype=h.dtype), h[:-1] / h[1:]])  # h_{k-1} / h_k
    step = xp.arange(h.shape[0])
    # First order where there is no previous x0 prediction, and (lower_order_final) on the step
    # onto t = 0, whose long log-SNR interval makes the linear extrapolation of D inaccurate.
    first_order = (step == 0) | ((step == h.shape[0] - 1) & lower_order_final)
    w_prev = xp.where(first_order, 0.0, 1.0 / (2.0 * r))
    one, zero = xp.ones((1,), dtype=h.dtype), xp.zeros((1,), dtype=h.dtype)
    a = xp.concatenate([sigma[1:] / sigma[:-1], zero])
    b = xp.concatenate([phi * (1.0 + w_prev), one])
    c = xp.concatenate([-phi * w_prev, zero])
    return a, b, c


def _heun_stages(timesteps: np.ndarray, ab: Any) -> tuple[np.ndarray, Any, Any, Any, np.ndarray]:
    """Heun's 2N - 1 model evaluations as stages (predictor at tau_k, corrector at tau_{k+1},
    ..., final Euler at t = 0): timestep, sigma, a = sqrt(ab), step delta, is_corrector."""
    xp = _xp(ab)
    sigma = xp.sqrt((1.0 - ab) / ab)
    n = timesteps.shape[0]
    pred, corr = np.arange(n - 1), np.arange(1, n)
    # Interleave: stage 2k = predictor at k, stage 2k + 1 = corrector at k + 1, stage 2N-2 final.
    order = np.empty(2 * n - 1, dtype=np.int64)
    order[0:-1:2], order[1::2], order[-1] = pred, corr, n - 1
    is_corr = np.zeros(2 * n - 1, dtype=bool)
    is_corr[1::2] = True
    delta_interval = sigma[1:] - sigma[:-1]  # (N-1,) < 0
    delta = xp.concatenate([xp.repeat(delta_interval, 2), -sigma[-1:]])
    return timesteps[order], sigma[order], xp.sqrt(ab)[order], delta, is_corr


def sample(
    model_fn: Callable[..., Array],
    sch: Schedule,
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
) -> Any:
    """Draw samples (B, ...) = `shape` from the model; see the module docstring.

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
    sample_ids: (B,) int, default arange(B); see the module docstring.
    x_init: (B, ...) start at t = timesteps[0] instead of x_T ~ N(0, I) (e.g. to interpolate
    between starting points of the deterministic samplers); injected noise is unchanged.
    lower_order_final: dpm_solver++ only; True takes the last update (onto t = 0) at first
    order (the DDIM step), much more accurate with few steps; False is pure 2M (second order
    on every step but the first). With num_steps = 3 and True, dpm_solver++ equals ddim.
    start_timestep: start the chain at this t (0..T-1) instead of T - 1, with the timesteps
    spaced over [start_timestep, 0] (SDEdit: pass x_init = q_sample(x0, start_timestep));
    needs num_steps <= start_timestep + 1.
    Static (Python) arguments: shape, sampler, num_steps, eta, prediction, clip_x0,
    timestep_spacing, variance, num_classes, return_trajectory, lower_order_final,
    start_timestep, learn_sigma.

    Returns x0 samples (B, ...) in JAX's default float dtype (float32 unless x64 is enabled),
    and with return_trajectory also a `Trajectory`.
    Raises ValueError (before tracing the model) for bad options, naming the allowed values.
    """
    num_timesteps = sch.num_timesteps
    validate_sampler_args(
        sampler=sampler,
        num_steps=num_steps,
        num_timesteps=num_timesteps,
        eta=eta,
        prediction=prediction,
        timestep_spacing=timestep_spacing,
        variance=variance,
        temperature=temperature,
        learn_sigma=learn_sigma,
    )
    if not isinstance(lower_order_final, (bool, np.bool_)):
        raise ValueError(f"lower_order_final must be a bool; got {lower_order_final!r}")
    shape = tuple(shape)
    if not shape or not all(is_int(d) and d >= 1 for d in shape):
        raise ValueError(f"shape must be a tuple of positive ints (B, ...); got {shape!r}")
    batch = shape[0]
    net = conditioned_model(model_fn, labels, guidance_scale, num_classes, batch)
    if sample_ids is None:
        sample_ids = jnp.arange(batch, dtype=jnp.int32)
    elif jnp.shape(sample_ids) != (batch,):
        raise ValueError(f"sample_ids must have shape ({batch},); got {jnp.shape(sample_ids)}")
    if x_init is not None and jnp.shape(x_init) != shape:
        raise ValueError(f"x_init must have shape {shape}; got {jnp.shape(x_init)}")

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
    dtype = diffusion.float_dtype()
    # A chain started at t_start is spaced like a schedule of t_start + 1 steps.
    chain_length = num_timesteps if start_timestep is None else start_timestep + 1
    timesteps = get_timesteps(chain_length, num_steps, timestep_spacing)
    # float64 numpy for a schedule closed over; a jax array when the schedule itself is traced.
    ab = sch.alphas_cumprod[timesteps]

    out_shape = (*shape[:-1], 2 * shape[-1]) if learn_sigma else shape

    def denoise_with_var(x: Array, t_step: Array) -> tuple[Array, Array, Array | None]:
        """(x0, eps) predictions (B, ...) at the integer timestep t_step (scalar), and the
        variance values (B, ...) of a learn_sigma model (else None)."""
        t = jnp.full((batch,), t_step, dtype=jnp.int32)
        out = net(x, t)
        if out.shape != out_shape:
            hint = " (a learned-variance model needs learn_sigma=True)" if not learn_sigma else ""
            raise ValueError(f"model_fn returned shape {out.shape}; expected {out_shape}{hint}")
        out = out.astype(dtype)
        var_values = None
        if learn_sigma:
            out, var_values = diffusion.split_learned_variance(out)
        x0, eps = diffusion.model_output_to_x0_eps(sch, x, t, out, prediction)
        if clip_x0:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = diffusion.predict_eps_from_x0(sch, x, t, x0)
        return x0.astype(dtype), eps.astype(dtype), var_values

    def denoise(x: Array, t_step: Array) -> tuple[Array, Array]:
        x0, eps, _ = denoise_with_var(x, t_step)
        return x0, eps

    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(sample_ids))

    def normal(index: Any) -> Array:
        """Per-sample N(0, I) noise (B, ...) from fold_in(key_i, index)."""
        return jax.vmap(
            lambda key: jax.random.normal(jax.random.fold_in(key, index), shape[1:], dtype)
        )(keys)

    def bcast(c: Array) -> Array:
        return c.astype(dtype).reshape((1,) * len(shape))

    x_init = normal(0) if x_init is None else jnp.asarray(x_init, dtype)
    steps = jnp.arange(num_steps, dtype=jnp.int32)
    ts = jnp.asarray(timesteps, dtype=jnp.int32)
    record = return_trajectory

    if sampler == "ddpm":
        c_x0, c_xt, std = _ddpm_coefficients(ab, variance)
        learned = variance == "learned_range"
        min_log, max_log = _learned_range_bounds(ab)

        def ddpm_body(x: Array, xs: tuple[Array, ...]) -> tuple[Array, Any]:
            k, t_step, a0, at, s, lo, hi = xs
            x0, _, var_values = denoise_with_var(x, t_step)
            if learned:
                assert var_values is not None  # learn_sigma is checked with the variance
                _, log_var = diffusion.learned_range_log_variance(bcast(lo), bcast(hi), var_values)
                # std is 0 on the last step (no noise into clean data), else 1 times the model's.
                s = jnp.where(s > 0, jnp.exp(0.5 * log_var), 0.0)
            else:
                s = bcast(s)
            z = normal(k + 1)
            x_next = bcast(a0) * x0 + bcast(at) * x + s * temperature * z
            return x_next.astype(dtype), ((x, x0) if record else None)

        out, ys = jax.lax.scan(
            ddpm_body, x_init, (steps, ts, *_as_jnp(c_x0, c_xt, std, min_log, max_log))
        )
        eval_ts = ts
    elif sampler == "ddim":
        c_x0, c_eps, c_z = _ddim_coefficients(ab, eta)
        stochastic = eta > 0.0

        def ddim_body(x: Array, xs: tuple[Array, ...]) -> tuple[Array, Any]:
            k, t_step, a0, ae, az = xs
            x0, eps = denoise(x, t_step)
            x_next = bcast(a0) * x0 + bcast(ae) * eps
            if stochastic:
                x_next = x_next + bcast(az) * temperature * normal(k + 1)
            return x_next.astype(dtype), ((x, x0) if record else None)

        out, ys = jax.lax.scan(ddim_body, x_init, (steps, ts, *_as_jnp(c_x0, c_eps, c_z)))
        eval_ts = ts
    elif sampler == "dpm_solver++":
        a, b, c = _dpm_solver_coefficients(ab, bool(lower_order_final))

        def dpm_body(carry: tuple[Array, Array], xs: tuple[Array, ...]) -> tuple[Any, Any]:
            x, d_prev = carry
            t_step, ca, cb, cc = xs
            d, _ = denoise(x, t_step)
            x_next = bcast(ca) * x + bcast(cb) * d + bcast(cc) * d_prev
            return (x_next.astype(dtype), d), ((x, d) if record else None)

        (out, _), ys = jax.lax.scan(
            dpm_body, (x_init, jnp.zeros_like(x_init)), (ts, *_as_jnp(a, b, c))
        )
        eval_ts = ts
    else:  # heun
        stage_ts, sigma, sqrt_ab, delta, is_corr = _heun_stages(timesteps, ab)
        num_stages = stage_ts.shape[0]
        is_final = np.arange(num_stages) == num_stages - 1

        def heun_body(carry: tuple[Array, ...], xs: tuple[Array, ...]) -> tuple[Any, Any]:
            y_base, y_eval, d_saved = carry
            t_step, sig, a, dlt, corr, final = xs
            x_in = bcast(a) * y_eval
            d0, _ = denoise(x_in, t_step)
            d = (y_eval - d0) / bcast(sig)  # dy/dsigma of the PF ODE
            # Predictor: Euler to the next sigma. Corrector: trapezoid with the saved slope.
            y_pred = y_base + bcast(dlt) * d
            y_corr = y_base + bcast(dlt) * 0.5 * (d_saved + d)
            new_base = jnp.where(corr, y_corr, y_base)
            new_eval = jnp.where(final, d0, jnp.where(corr, y_corr, y_pred))
            new_saved = jnp.where(corr, d_saved, d)
            new = (new_base.astype(dtype), new_eval.astype(dtype), new_saved.astype(dtype))
            return new, ((x_in, d0) if record else None)

        y_init = x_init / bcast(jnp.asarray(sqrt_ab[0]))
        (_, out, _), ys = jax.lax.scan(
            heun_body,
            (y_init, y_init, jnp.zeros_like(y_init)),
            (jnp.asarray(stage_ts, jnp.int32), *_as_jnp(sigma, sqrt_ab, delta), is_corr, is_final),
        )
        eval_ts = jnp.asarray(stage_ts, jnp.int32)

    out = out.astype(dtype)
    if return_trajectory:
        return out, Trajectory(timesteps=eval_ts, x_t=ys[0], x0_pred=ys[1])
    return out


def _as_jnp(*arrays: Any) -> tuple[Array, ...]:
    """Per-step coefficients (float64 numpy) as scan inputs of the default float dtype."""
    dtype = diffusion.float_dtype()
    return tuple(jnp.asarray(a, dtype=dtype) for a in arrays)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Every sampler option in one value: built once (from a config, or by hand) and passed to
    `sample`, the sample / eval / edit modes, analysis and benchmarks alike.

    prediction and learn_sigma describe the model (the config's `diffusion.prediction` and
    `model.learn_sigma`); num_classes is the class count of a class-conditional model (else
    None). The rest are `config.sampling` keys; see `sample` for their meaning.
    """

    sampler: str = "ddim"
    num_steps: int = 50
    eta: float = 0.0
    prediction: str = "eps"
    clip_x0: bool = True
    temperature: float = 1.0
    timestep_spacing: str = "linspace"
    variance: str = "fixed_small"
    guidance_scale: float = 1.0
    num_classes: int | None = None
    learn_sigma: bool = False
    lower_order_final: bool = True

    @classmethod
    def from_config(cls, config: Any, num_classes: int | None = None) -> SamplerSpec:
        """From a run config's `sampling`, `diffusion.prediction` and `model.learn_sigma`
        (any mapping with those sections, e.g. an ml_collections ConfigDict)."""
        s = config.sampling
        return cls(
            sampler=s.sampler,
            num_steps=s.num_steps,
            eta=s.eta,
            prediction=config.diffusion.prediction,
            clip_x0=s.clip_x0,
            temperature=s.temperature,
            timestep_spacing=s.timestep_spacing,
            variance=s.variance,
            guidance_scale=s.guidance_scale,
            num_classes=num_classes,
            # A learned-variance model outputs 2C channels; the samplers must know to split them.
            learn_sigma=bool(config.model.get("learn_sigma", False)),
            lower_order_final=bool(s.get("lower_order_final", True)),
        )

    def replace(self, **changes: Any) -> SamplerSpec:
        """A copy with `changes` (unknown names raise TypeError)."""
        return dataclasses.replace(self, **changes)

    def validate(self, sch: Schedule) -> None:
        """Raise ValueError naming the fix for any bad option, including options that fail on
        the schedule's values (a DDIM eta too large for its timesteps)."""
        validate_sampler_args(
            sampler=self.sampler,
            num_steps=self.num_steps,
            num_timesteps=sch.num_timesteps,
            eta=self.eta,
            prediction=self.prediction,
            timestep_spacing=self.timestep_spacing,
            variance=self.variance,
            temperature=self.temperature,
            learn_sigma=self.learn_sigma,
        )
        validate_on_schedule(
            sch,
            sampler=self.sampler,
            num_steps=self.num_steps,
            eta=self.eta,
            timestep_spacing=self.timestep_spacing,
        )

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of `sample`."""
        return dataclasses.asdict(self)

    @property
    def tag(self) -> str:
        """Short file-name tag, e.g. 'ddim50' or 'dpm_solverpp20'."""
        return f"{self.sampler.replace('+', 'p')}{self.num_steps}"

    def sample(
        self,
        model_fn: Callable[..., Array],
        sch: Schedule,
        shape: tuple[int, ...],
        rng: Array,
        **inputs: Any,
    ) -> Any:
        """`sample(model_fn, sch, shape, rng, **self.kwargs(), **inputs)`; inputs are the
        per-call arguments (labels, sample_ids, x_init, start_timestep, return_trajectory)."""
        return sample(model_fn, sch, shape, rng, **self.kwargs(), **inputs)
