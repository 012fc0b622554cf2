"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", section 3): power-function EMAs tracked during training, and the least-squares
reconstruction of an EMA of any length from their snapshots.

A power-function EMA with exponent gamma averages the parameters theta(tau) seen up to time t
with the profile p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]: its length grows with
training. Its relative standard deviation, the width of the profile over t, is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))      (`gamma_to_sigma_rel`)

In steps (t = 1, 2, ... counts the updates, theta_t the parameters after update t), the EMA is
updated by ema_t = beta_t ema_(t-1) + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma + 1);
so ema_1 = theta_1, and

    ema_t = sum_k (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1) theta_k,

the profile integrated over each step's unit interval (`power_ema_weights`): exactly the
continuous average of piecewise-constant parameters. The reconstruction
(`reconstruction_coefficients`) finds the coefficients x of the snapshots whose combined
profile sum_i x_i p_i is closest in L2 to the target profile, by least squares on their inner
products in closed form; `sum_i x_i snapshot_i` is then the reconstructed EMA.

Everything here is float64 numpy, except `update`, which runs in the jitted training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.errors import ConfigError

PyTree = Any

# sigma_rel of gamma = 0 (the uniform average of the whole run): the largest length whose gamma,
# the larger root of the cubic below, is >= 0. Longer EMAs would weight early training more than
# late, which is no use.
MAX_SIGMA_REL = float(np.sqrt(1.0 / 12.0))


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile with exponent `gamma`."""
    g = float(gamma)
    return float(np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0))))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 of the profile of relative width `sigma_rel` in (0, 1/sqrt(12)].

    sigma_rel^-2 = (gamma + 2)^2 (gamma + 3) / (gamma + 1) is the cubic
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2; its largest real
    root is the one on the branch where a longer EMA has a smaller gamma.
    """
    sigma_rel = float(sigma_rel)
    if not (np.isfinite(sigma_rel) and 0.0 < sigma_rel <= MAX_SIGMA_REL):
        raise ConfigError(
            f"sigma_rel={sigma_rel}; use a value in (0, {MAX_SIGMA_REL:.4f}] (EDM2 uses 0.05-0.2)"
        )
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots.real))].real
    return float(max(float(real.max()), 0.0))


def power_ema_weights(num_steps: int, gamma: float) -> np.ndarray:
    """float64 (num_steps,): the weight of theta_k (k = 1..num_steps) in ema_num_steps, the
    closed form of the per-step update (they sum to 1)."""
    k = np.arange(1, num_steps + 1, dtype=np.float64)
    e = gamma + 1.0
    return np.asarray((k**e - (k - 1.0) ** e) / float(num_steps) ** e)


def update_weight(step: jax.Array, gamma: float) -> jax.Array:
    """1 - beta_t, float32 (), for the update made by the step that starts at `step` (0-based,
    so t = step + 1): -expm1((gamma + 1) log1p(-1/t)), accurate for large t where
    1 - (1 - 1/t)^(gamma + 1) in float32 would cancel. 1 at the first update."""
    t = jnp.asarray(step, jnp.float32) + 1.0
    return -jnp.expm1(jnp.float32(gamma + 1.0) * jnp.log1p(-1.0 / t))


def update(
    emas: tuple[PyTree, ...], params: PyTree, step: jax.Array, gammas: Sequence[float]
) -> tuple[PyTree, ...]:
    """The power-function EMAs (one per gamma) after the update made by the step starting at
    `step` with the resulting `params` (jittable)."""
    updated = []
    for ema, gamma in zip(emas, gammas, strict=True):
        w = update_weight(step, gamma)
        # w p + (1 - w) e: exactly p at the first update (w = 1), whatever e holds.
        updated.append(jax.tree.map(lambda e, p, w=w: w * p + (1.0 - w) * e, ema, params))
    return tuple(updated)


def profile_inner_products(
    steps_a: Sequence[float] | np.ndarray,
    gammas_a: Sequence[float] | np.ndarray,
    steps_b: Sequence[float] | np.ndarray,
    gammas_b: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """float64 (len(a), len(b)): the L2 inner products of the profiles of EMAs (t_i, gamma_i)
    and (t_j, gamma_j) on [0, inf):

        (gamma_i + 1)(gamma_j + 1) min(t_i, t_j)^(gamma_i + gamma_j + 1)
        / ((gamma_i + gamma_j + 1) t_i^(gamma_i + 1) t_j^(gamma_j + 1))
    """
    ti = np.asarray(steps_a, np.float64)[:, None]
    gi = np.asarray(gammas_a, np.float64)[:, None]
    tj = np.asarray(steps_b, np.float64)[None, :]
    gj = np.asarray(gammas_b, np.float64)[None, :]
    g = gi + gj + 1.0
    # In logs: t^gamma overflows float64 for long runs with large gammas.
    log = (
        np.log(gi + 1.0)
        + np.log(gj + 1.0)
        - np.log(g)
        + g * np.log(np.minimum(ti, tj))
        - (gi + 1.0) * np.log(ti)
        - (gj + 1.0) * np.log(tj)
    )
    return np.asarray(np.exp(log))


def reconstruction_coefficients(
    snapshot_steps: Sequence[float] | np.ndarray,
    snapshot_gammas: Sequence[float] | np.ndarray,
    target_step: int,
    target_gamma: float,
) -> np.ndarray:
    """float64 (num_snapshots,): x minimising || sum_i x_i p_i - p_target ||_2 over the
    snapshots' profiles p_i (EMA exponent snapshot_gammas[i] at snapshot_steps[i] >= 1), by
    least squares on the Gram matrix (`profile_inner_products`)."""
    steps = np.asarray(snapshot_steps, np.float64)
    gammas = np.asarray(snapshot_gammas, np.float64)
    if steps.shape != gammas.shape or steps.ndim != 1 or not len(steps):
        raise ValueError("snapshot_steps and snapshot_gammas: equal, non-empty 1-D sequences")
    if np.any(steps < 1) or target_step < 1:
        raise ValueError("steps count updates from 1")
    gram = profile_inner_products(steps, gammas, steps, gammas)
    rhs = profile_inner_products(steps, gammas, np.array([target_step]), np.array([target_gamma]))
    coefficients, *_ = np.linalg.lstsq(gram, rhs[:, 0], rcond=None)
    return np.asarray(coefficients, np.float64)


def reconstruction_error(
    snapshot_steps: Sequence[float] | np.ndarray,
    snapshot_gammas: Sequence[float] | np.ndarray,
    coefficients: np.ndarray,
    target_step: int,
    target_gamma: float,
) -> float:
    """|| sum_i x_i p_i - p_target ||_2 / || p_target ||_2: how well the snapshots' profiles
    span the target's (0 when it is one of them)."""
    steps = np.asarray(snapshot_steps, np.float64)
    gammas = np.asarray(snapshot_gammas, np.float64)
    x = np.asarray(coefficients, np.float64)
    target = (np.array([target_step], np.float64), np.array([target_gamma], np.float64))
    tt = profile_inner_products(*target, *target)[0, 0]
    cross = profile_inner_products(steps, gammas, *target)[:, 0]
    gram = profile_inner_products(steps, gammas, steps, gammas)
    squared = x @ gram @ x - 2.0 * x @ cross + tt
    return float(np.sqrt(max(squared, 0.0) / tt))
