"""Forward process, posterior, eps / x0 / v conversions, training losses (with Improved DDPM's
hybrid loss for learned variances) and the terms of the variational bound (`normal_kl`, the
discretised decoder, `vlb_terms`, `prior_bpd`; summed over t by `likelihood.bits_per_dim`).

Every function takes the schedule `sch`, integer timesteps `t`: int (B,) in [0, T) and arrays
x: (B, ...) batched over the leading axis with any trailing shape. Schedule coefficients are
float64 numpy; `extract` gathers them in JAX's default float dtype (float32 unless x64 is
enabled). Everything is pure and jittable; string options are static Python values.

Notation: a_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t), SNR_t = ab_t / (1 - ab_t), and
    x_t = a_t x0 + sigma_t eps,    v = a_t eps - sigma_t x0  (Salimans & Ho 2022).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from diffusion_jax.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
LOSS_WEIGHTINGS = ("simple", "snr", "min_snr")

Array = jax.Array
ModelFn = Callable[..., Array]


def float_dtype() -> Any:
    """JAX's default float dtype: float32, or float64 when jax_enable_x64 is on."""
    return jax.dtypes.canonicalize_dtype(np.float64)


def extract(arr: Any, t: Any, ndim: int) -> Array:
    """Gather arr[t] shaped (B, 1, ..., 1) to broadcast against a rank-`ndim` x.

    arr: (T,) float64 numpy (or traced) array; t: int (B,) (or a scalar). Returns
    `float_dtype()` values.
    """
    values = jnp.asarray(arr, dtype=float_dtype())[jnp.asarray(t)]
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _check_choice(kind: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; use one of {allowed}")


def q_sample(sch: Schedule, x0: Array, t: Array, noise: Array) -> Array:
    """Sample x_t ~ q(x_t | x_0) = a_t x0 + sigma_t noise. x0, noise: (B, ...) -> (B, ...)."""
    return (
        extract(sch.sqrt_alphas_cumprod, t, x0.ndim) * x0
        + extract(sch.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
    )


def q_posterior(sch: Schedule, x0: Array, x_t: Array, t: Array) -> tuple[Array, Array, Array]:
    """q(x_{t-1} | x_t, x_0) = N(mean, variance): x0, x_t: (B, ...).

    Returns (mean (B, ...), variance (B, 1, ..., 1), log_variance_clipped (B, 1, ..., 1)).
    At t = 0 the mean is x0 and the variance 0 (its log is clipped to that of t = 1).
    """
    mean = (
        extract(sch.posterior_mean_coef1, t, x_t.ndim) * x0
        + extract(sch.posterior_mean_coef2, t, x_t.ndim) * x_t
    )
    variance = extract(sch.posterior_variance, t, x_t.ndim)
    log_variance = extract(sch.posterior_log_variance_clipped, t, x_t.ndim)
    return mean, variance, log_variance


def predict_x0_from_eps(sch: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
    """x0 = (x_t - sigma_t eps) / a_t. x_t, eps: (B, ...)."""
    return (
        extract(sch.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(sch.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
    )


def predict_eps_from_x0(sch: Schedule, x_t: Array, t: Array, x0: Array) -> Array:
    """eps = (x_t - a_t x0) / sigma_t. x_t, x0: (B, ...)."""
    return (extract(sch.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / extract(
        sch.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
    )


def v_target(sch: Schedule, x0: Array, noise: Array, t: Array) -> Array:
    """v = a_t noise - sigma_t x0. x0, noise: (B, ...)."""
    return (
        extract(sch.sqrt_alphas_cumprod, t, x0.ndim) * noise
        - extract(sch.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
    )


def predict_x0_from_v(sch: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """x0 = a_t x_t - sigma_t v. x_t, v: (B, ...)."""
    return (
        extract(sch.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(sch.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v
    )


def predict_eps_from_v(sch: Schedule, x_t: Array, t: Array, v: Array) -> Array:
    """eps = sigma_t x_t + a_t v. x_t, v: (B, ...)."""
    return (
        extract(sch.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
        + extract(sch.sqrt_alphas_cumprod, t, x_t.ndim) * v
    )


def model_output_to_x0_eps(
    sch: Schedule, x_t: Array, t: Array, output: Array, prediction: str
) -> tuple[Array, Array]:
    """Convert a model output of type `prediction` ('eps' | 'x0' | 'v') to (x0, eps), (B, ...)."""
    _check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        return predict_x0_from_eps(sch, x_t, t, output), output
    if prediction == "x0":
        return output, predict_eps_from_x0(sch, x_t, t, output)
    return predict_x0_from_v(sch, x_t, t, output), predict_eps_from_v(sch, x_t, t, output)


def split_learned_variance(output: Array) -> tuple[Array, Array]:
    """Split a learned-variance output (B, ..., 2C) into (prediction, variance values), each
    (B, ..., C): the first C channels are the eps / x0 / v prediction, the last C the raw
    interpolation value v of `learned_range_log_variance`."""
    channels = output.shape[-1]
    if channels % 2:
        raise ValueError(
            f"a learned-variance model must output 2C channels; got {channels} (odd): build it "
            "with learn_sigma=True"
        )
    return output[..., : channels // 2], output[..., channels // 2 :]


def learned_range_log_variance(
    min_log: Array, max_log: Array, var_values: Array
) -> tuple[Array, Array]:
    """Improved DDPM's interpolated log-variance: with frac = (v + 1) / 2,
    log_var = frac * max_log + (1 - frac) * min_log (frac 0 -> min, 1 -> max; not clipped).

    min_log, max_log: broadcastable to var_values (B, ...), e.g. (B, 1, ..., 1) for the clipped
    log posterior variance and log(beta_t). Returns (variance, log_variance), each (B, ...).
    """
    frac = (var_values + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
    return jnp.exp(log_var), log_var


def p_mean_variance(
    sch: Schedule,
    output: Array,
    x_t: Array,
    t: Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
) -> tuple[Array, Array, Array, Array]:
    """The reverse step p(x_{t-1} | x_t) of Ho et al. from a model output: (B, ...).

    The mean is the posterior mean q(x_{t-1} | x_t, x0_pred), with x0_pred clipped to [-1, 1]
    if `clip_x0`. variance: 'fixed_small' = posterior variance (log clipped at t = 0);
    'fixed_large' = beta_t, with entry 0 replaced by posterior_variance[1] (Ho et al.);
    'learned_range' (Nichol & Dhariwal 2021) = `output` has 2C channels (B, ..., 2C), the last C
    interpolating the log-variance between the clipped log posterior variance (min) and
    log(beta_t) (max), see `learned_range_log_variance`.
    Returns (mean (B, ...), variance, log_variance, x0_pred (B, ...)); the variances are
    (B, 1, ..., 1) when fixed and (B, ...) when learned.
    """
    _check_choice("variance", variance, VARIANCES)
    var_values = None
    if variance == "learned_range":
        output, var_values = split_learned_variance(output)
    x0, _ = model_output_to_x0_eps(sch, x_t, t, output, prediction)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
    mean, small_var, small_log_var = q_posterior(sch, x0, x_t, t)
    if variance == "fixed_small":
        return mean, small_var, small_log_var, x0
    if var_values is not None:
        max_log = extract(_log(sch.betas), t, x_t.ndim)
        var, log_var = learned_range_log_variance(small_log_var, max_log, var_values)
        return mean, var, log_var, x0
    large_var = extract(sch.large_variance, t, x_t.ndim)
    large_log_var = extract(sch.large_log_variance, t, x_t.ndim)
    return mean, large_var, large_log_var, x0


def _log(arr: Any) -> Any:
    """log in float64 numpy for a schedule closed over, traced for a schedule passed in."""
    return np.log(arr) if isinstance(arr, np.ndarray) else jnp.log(arr)


def normal_kl(mean1: ArrayLike, logvar1: ArrayLike, mean2: ArrayLike, logvar2: ArrayLike) -> Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise (broadcast).

    = 0.5 (logvar2 - logvar1 + exp(logvar1 - logvar2) - 1 + (mean1 - mean2)^2 exp(-logvar2)),
    with exp(d) - 1 as expm1(d): exact 0 for equal distributions and no cancellation when the
    variances are close (the KL terms of a good model at large t).
    """
    mean1, logvar1, mean2, logvar2 = (jnp.asarray(a) for a in (mean1, logvar1, mean2, logvar2))
    log_ratio = logvar1 - logvar2
    return 0.5 * (-log_ratio + jnp.expm1(log_ratio) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Array, means: Array, log_scales: Array) -> Array:
    """log P(x) in nats, elementwise, of data x in [-1, 1] quantised to 256 levels (uint8 k at
    x = 2k / 255 - 1) under N(means, exp(log_scales)^2) integrated over each level's bin of
    width 2 / 255; the edge bins extend to -inf and +inf, so the 256 probabilities sum to 1.

    x, means, log_scales broadcast together. Tails stay exact: the edge bins use log Phi, and an
    inner bin is reflected to the left of the mean (the normal is symmetric) so that both CDFs
    are small and their difference keeps its digits, log(Phi(b) - Phi(a)) = log Phi(b) +
    log(1 - exp(log Phi(a) - log Phi(b))).
    """
    half_bin = 1.0 / 255.0
    inv_scale = jnp.exp(-log_scales)
    centered = x - means
    lowest = jax.scipy.special.log_ndtr((centered + half_bin) * inv_scale)  # (-inf, x + h]
    highest = jax.scipy.special.log_ndtr((half_bin - centered) * inv_scale)  # [x - h, inf)
    u = -jnp.abs(centered)
    log_hi = jax.scipy.special.log_ndtr((u + half_bin) * inv_scale)
    log_lo = jax.scipy.special.log_ndtr((u - half_bin) * inv_scale)
    # Capped below 0 so a bin far narrower than the scale stays finite (and its gradient too).
    diff = jnp.minimum(log_lo - log_hi, -1e-30)
    inner = log_hi + jnp.log(-jnp.expm1(diff))
    # Thresholds between the edge level and its neighbour (2 / 255 away).
    return jnp.where(x < -0.999, lowest, jnp.where(x > 0.999, highest, inner))


def _mean_over_dims(x: Array) -> Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vlb_terms(
    sch: Schedule,
    output: Array,
    x0: Array,
    x_t: Array,
    t: Array,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
) -> Array:
    """The term L_t of the variational bound in bits per dimension, (B,).

    t >= 1: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); t = 0: the decoder NLL
    -log p(x0 | x_t) of the 256-level data (`discretized_gaussian_log_likelihood` with the
    reverse step's mean and scale). Each is the mean over the non-batch dimensions divided by
    log 2. output: model output (B, ...) at (x_t, t) ((B, ..., 2C) for 'learned_range');
    x0: clean data (B, ...) in [-1, 1]; x_t: (B, ...); t: int (B,).
    """
    true_mean, _, true_log_var = q_posterior(sch, x0, x_t, t)
    mean, _, log_var, _ = p_mean_variance(
        sch, output, x_t, t, prediction=prediction, variance=variance, clip_x0=clip_x0
    )
    kl = _mean_over_dims(normal_kl(true_mean, true_log_var, mean, log_var)) / np.log(2.0)
    nll = -_mean_over_dims(
        discretized_gaussian_log_likelihood(x0, mean, 0.5 * jnp.broadcast_to(log_var, x0.shape))
    ) / np.log(2.0)
    return jnp.where(t == 0, nll, kl)


def prior_bpd(sch: Schedule, x0: Array) -> Array:
    """KL(q(x_T | x0) || N(0, I)) in bits per dimension, (B,), for x0: (B, ...); no
    parameters, so no training signal, but part of the bound."""
    t_last = jnp.full((x0.shape[0],), sch.num_timesteps - 1, dtype=jnp.int32)
    mean = extract(sch.sqrt_alphas_cumprod, t_last, x0.ndim) * x0
    log_var = extract(2.0 * _log(sch.sqrt_one_minus_alphas_cumprod), t_last, x0.ndim)
    kl = normal_kl(mean, jnp.broadcast_to(log_var, x0.shape), 0.0, 0.0)
    return _mean_over_dims(kl) / np.log(2.0)


def loss_weights(
    sch: Schedule, *, prediction: str, weighting: str, min_snr_gamma: float = 5.0
) -> Any:
    """(T,) weights w_t such that loss_t = w_t * mean((output - target)^2).

    'simple': w = 1 (MSE against the target of `prediction`). 'snr' / 'min_snr': the x0-space
    error |x0_pred - x0|^2 weighted by SNR_t / min(SNR_t, gamma) (Hang et al. 2023), written on
    the output error in closed form so it stays finite: |x0 err|^2 = |eps err|^2 / SNR =
    |v err|^2 / (SNR + 1). So 'snr' with 'eps' equals 'simple'. float64 numpy for a numpy
    schedule.
    """
    _check_choice("prediction", prediction, PREDICTIONS)
    _check_choice("loss weighting", weighting, LOSS_WEIGHTINGS)
    xp: Any = np if isinstance(sch.log_snr, np.ndarray) else jnp
    snr = xp.exp(sch.log_snr)
    if weighting == "simple":
        return xp.ones_like(snr)
    x0_weight = snr if weighting == "snr" else xp.minimum(snr, min_snr_gamma)
    if prediction == "x0":
        return x0_weight
    if prediction == "eps":
        return x0_weight / snr
    return x0_weight / (snr + 1.0)


def per_example_loss(
    sch: Schedule,
    output: Array,
    x0: Array,
    noise: Array,
    t: Array,
    *,
    prediction: str = "eps",
    weighting: str = "simple",
    min_snr_gamma: float = 5.0,
) -> Array:
    """Weighted squared error (B,) of `output` (B, ...) for x_t = q_sample(sch, x0, t, noise).

    The error is averaged over all non-batch axes; see `loss_weights` for the weighting.
    """
    _check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        target = noise
    elif prediction == "x0":
        target = x0
    else:
        target = v_target(sch, x0, noise, t)
    weights = loss_weights(
        sch, prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma
    )
    err = jnp.mean(jnp.square(output - target), axis=tuple(range(1, output.ndim)))
    return extract(weights, t, 1) * err


def drop_labels(rng: Array, labels: Array, num_classes: int, rate: float) -> Array:
    """Replace each label (B,) by the null class `num_classes` with probability `rate`."""
    drop = jax.random.uniform(rng, labels.shape) < rate
    return jnp.where(drop, jnp.asarray(num_classes, labels.dtype), labels)


def check_label_dropout(
    label_dropout: float, labels: Array | None, num_classes: int | None
) -> None:
    """ValueError unless label_dropout is in [0, 1], with labels and num_classes when > 0."""
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must be in [0, 1]; got {label_dropout}")
    if label_dropout > 0.0 and (labels is None or num_classes is None):
        raise ValueError(
            "label_dropout > 0 needs labels and num_classes (the null label is num_classes)"
        )


def training_net(
    model_fn: ModelFn,
    labels: Array | None,
    num_classes: int | None,
    label_dropout: float,
    rng: Array,
) -> Callable[[Array, Array], Array]:
    """`net(x, time)` for a training loss: model_fn(x, time) without labels, else
    model_fn(x, time, labels) with each label dropped to the null class num_classes with
    probability label_dropout (classifier-free guidance training; `check_label_dropout`)."""
    if labels is None:
        return lambda x, time: model_fn(x, time)
    if label_dropout > 0.0:
        assert num_classes is not None  # check_label_dropout
        labels = drop_labels(rng, labels, num_classes, label_dropout)
    bound = labels
    return lambda x, time: model_fn(x, time, bound)


def training_loss(
    model_fn: ModelFn,
    sch: Schedule,
    x0: Array,
    rng: Array,
    *,
    prediction: str = "eps",
    weighting: str = "simple",
    min_snr_gamma: float = 5.0,
    labels: Array | None = None,
    num_classes: int | None = None,
    label_dropout: float = 0.0,
    t: Array | None = None,
    noise: Array | None = None,
    learn_sigma: bool = False,
    vlb_weight: float = 0.001,
) -> Array:
    """Per-example denoising loss (B,) for clean data x0: (B, ...).

    Draws t ~ U{0..T-1} and noise ~ N(0, I) from `rng` (unless given), forms x_t and calls
    `model_fn(x_t, t)`, or `model_fn(x_t, t, labels)` when labels (B,) int are given. With
    `label_dropout` > 0 each label is replaced by the null class `num_classes` with that
    probability (classifier-free guidance training). See `per_example_loss` for `weighting`.

    learn_sigma: the model outputs (B, ..., 2C) (prediction, variance values; see
    `p_mean_variance` 'learned_range') and the loss is Nichol & Dhariwal's hybrid
    L_simple + vlb_weight * L_vlb. L_vlb = sum_t L_t is estimated from the one sampled t as
    T * L_t (t uniform, so E[T * L_t] = L_vlb), L_t from `vlb_terms` in bits/dim without
    clipping x0. The mean prediction enters L_t through a stop-gradient, so L_vlb trains only
    the variance and L_simple only the mean. With vlb_weight = 0.001 this is the reference
    code's `vb * T / 1000` ('rescaled MSE'); the paper's lambda = 0.001 keeps the noisy VLB
    gradient from swamping L_simple.
    """
    _check_choice("prediction", prediction, PREDICTIONS)
    _check_choice("loss weighting", weighting, LOSS_WEIGHTINGS)
    check_label_dropout(label_dropout, labels, num_classes)
    if weighting == "min_snr" and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0; got {min_snr_gamma}")
    if not vlb_weight >= 0:
        raise ValueError(f"vlb_weight must be >= 0 (0 = L_simple only); got {vlb_weight}")
    t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
    batch = x0.shape[0]
    if t is None:
        t = jax.random.randint(t_rng, (batch,), 0, sch.num_timesteps, dtype=jnp.int32)
    if noise is None:
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    x_t = q_sample(sch, x0, t, noise).astype(x0.dtype)
    net = training_net(model_fn, labels, num_classes, label_dropout, drop_rng)
    output = net(x_t, t).astype(x_t.dtype)
    var_values = None
    if learn_sigma:
        output, var_values = split_learned_variance(output)
    loss = per_example_loss(
        sch,
        output,
        x0,
        noise,
        t,
        prediction=prediction,
        weighting=weighting,
        min_snr_gamma=min_snr_gamma,
    )
    if var_values is None:
        return loss
    frozen = jnp.concatenate([jax.lax.stop_gradient(output), var_values], axis=-1)
    vlb = vlb_terms(
        sch, frozen, x0, x_t, t, prediction=prediction, variance="learned_range", clip_x0=False
    )
    return loss + vlb_weight * sch.num_timesteps * vlb
