"""Bits per dimension of data under a trained model: the full variational bound of Ho et al.

For 256-level data x0 in [-1, 1] the negative log-likelihood is bounded by

    L = L_prior + sum_{t >= 1} L_t + L_0,
    L_prior = KL(q(x_{T-1} | x0) || N(0, I)),
    L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))   (t >= 1),
    L_0 = -log p(x0 | x_0-noised)                          (the discretised decoder),

each term an expectation over x_t ~ q(x_t | x0) (indices as in `schedules`: t = 0..T-1, t = 0
the least noisy). `bits_per_dim` estimates every L_t with one x_t per example and t and sums
them exactly over all T timesteps (no subsampling of t), in bits per dimension.

The T model evaluations run as one `lax.scan` over t, so jit a function that closes over the
model and passes the parameters as arguments:

    @jax.jit
    def bpd(params, x0, rng):
        fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
        return likelihood.bits_per_dim(fn, sch, x0, rng, prediction='eps')['total']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.schedules import Schedule

Array = jax.Array


def bits_per_dim(
    model_fn: Callable[..., Array],
    sch: Schedule,
    x0: Array,
    rng: Array,
    *,
    prediction: str,
    variance: str = "fixed_small",
    clip_x0: bool = True,
    labels: Array | None = None,
    example_ids: Array | None = None,
) -> dict[str, Array]:
    """The variational bound on -log2 p(x0) per dimension, per example. Pure and jittable.

    model_fn(x_t (B, ...), t int32 (B,)) -> output of type `prediction` ('eps' | 'x0' | 'v'),
    (B, ..., 2C) for variance='learned_range'; called as model_fn(x_t, t, labels) when labels
    (B,) int are given. x0: (B, ...) data in [-1, 1] on the 256-level grid 2k / 255 - 1.
    variance: the reverse variance, 'fixed_small' | 'fixed_large' | 'learned_range' (see
    `diffusion.p_mean_variance`); clip_x0 clips the x0 prediction to [-1, 1] (Improved DDPM
    evaluates with it).
    Noise: example i at timestep t uses x_t = q_sample(x0_i, t, eps) with eps ~ N(0, I) from
    fold_in(fold_in(rng, example_ids[i]), t); example_ids default to arange(B). Pass the
    examples' indices in the whole evaluation set and the result does not depend on batching.

    Returns float32 arrays:
      'total'  (B,)    bits/dim of each example: prior + all T terms
      'prior'  (B,)    KL(q(x_{T-1} | x0) || N(0, I))
      'terms'  (T, B)  L_t; row 0 is the decoder NLL -log p(x0 | x_0-noised), rows t >= 1 KLs
    Raises ValueError for an unknown prediction or variance, or ids of the wrong shape.
    """
    if prediction not in diffusion.PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; use one of {diffusion.PREDICTIONS}")
    if variance not in diffusion.VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; use one of {diffusion.VARIANCES}")
    batch = x0.shape[0]
    if example_ids is None:
        example_ids = jnp.arange(batch, dtype=jnp.int32)
    elif jnp.shape(example_ids) != (batch,):
        raise ValueError(f"example_ids must have shape ({batch},); got {jnp.shape(example_ids)}")
    if labels is not None and jnp.shape(labels) != (batch,):
        raise ValueError(f"labels must have shape ({batch},); got {jnp.shape(labels)}")
    dtype = diffusion.float_dtype()
    x0 = jnp.asarray(x0, dtype)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(example_ids))

    def term(_: Any, t_step: Array) -> tuple[Any, Array]:
        """L_t (B,) at the scalar timestep t_step."""
        t = jnp.full((batch,), t_step, dtype=jnp.int32)
        noise = jax.vmap(
            lambda key: jax.random.normal(jax.random.fold_in(key, t_step), x0.shape[1:], dtype)
        )(keys)
        x_t = diffusion.q_sample(sch, x0, t, noise)
        output = model_fn(x_t, t) if labels is None else model_fn(x_t, t, labels)
        terms = diffusion.vlb_terms(
            sch,
            output.astype(dtype),
            x0,
            x_t,
            t,
            prediction=prediction,
            variance=variance,
            clip_x0=clip_x0,
        )
        return None, terms

    _, terms = jax.lax.scan(term, None, jnp.arange(sch.num_timesteps, dtype=jnp.int32))
    prior = diffusion.prior_bpd(sch, x0)
    return {"total": prior + jnp.sum(terms, axis=0), "prior": prior, "terms": terms}
