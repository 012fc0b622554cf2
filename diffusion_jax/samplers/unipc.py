"""unipc: UniPC (Zhao et al. 2023), the unified predictor-corrector multistep solver, in data
prediction with B(h) = e^h - 1 ('bh2', the paper's choice for few steps and guidance), on the
grid in lambda = -log sigma.

Each model evaluation D_k at level k first corrects the state there (UniC: the update from
level k-1 taken again with D_k in its difference terms, raising its order by one at no extra
evaluation), then predicts the next level from the corrected state (UniP, of order
min(order, history); with lower_order_final the update onto the last level is first order, as
for DPM-Solver++). The prediction is evaluated, not the corrected state (the method's point:
the corrector reuses that evaluation). The last step, onto sigma = 0, returns D_{N-1}: as in
diffusers with a final sigma of 0, the corrector at the last level has nothing left to change.
N model evaluations. A history level at sigma = inf (flow's t = 1) carries no derivative, so
orders are capped to the finite history.

Coefficients (with hh = -h, phi_1 = e^hh - 1, B = e^hh - 1, rk_i = (lambda_{k-1-i} -
lambda_{k-1}) / h and D1_i = (D_{k-1-i} - D_{k-1}) / rk_i for order p):
    base  = (s_k / s_{k-1}) x - alpha_k phi_1 D_{k-1}
    UniP: x_k = base - alpha_k B sum_i rho^p_i D1_i,  rho^p solves R[:-1, :-1] rho = b[:-1]
          (rho = 1/2 for p = 2)
    UniC: x_k = base - alpha_k B (sum_i rho^c_i D1_i + rho^c_p (D_k - D_{k-1})),
          rho^c solves R rho = b (rho = 1/2 for p = 1)
with R_ij = rk_j^(i-1) (rk_p = 1) and b_i = i! h phi_{i+1}(hh) / B (the paper's Algorithm 3;
`_step_coefficients`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import Chain, Sampler, Scan, option, scan_inputs
from diffusion_jax.samplers.dpm_solver import log_snr_steps, step_orders

Array = jax.Array
MAX_ORDER = 3


@dataclasses.dataclass(frozen=True)
class UniPCOptions:
    """order: the predictor's order (1-3; the corrector adds one); lower_order_final as for
    DPM-Solver++."""

    order: int = option(2, lambda v: f"order{v}")
    lower_order_final: bool = option(True, lambda value: "nolof")

    def check(self) -> None:
        if not isinstance(self.order, int) or not 1 <= self.order <= MAX_ORDER:
            raise ValueError(f"order must be an integer in [1, {MAX_ORDER}]; got {self.order!r}")
        if not isinstance(self.lower_order_final, (bool, np.bool_)):
            raise ValueError(f"lower_order_final must be a bool; got {self.lower_order_final!r}")


def _step_coefficients(
    lam: np.ndarray, k: int, order: int
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """For the update level k-1 -> k of `order` p: the predictor's weights on
    (D_{k-1}, ..., D_{k-p}) and the corrector's on (D_k, D_{k-1}, ..., D_{k-p}), both without
    the base's -alpha_k phi_1 D_{k-1}, as multiples of -alpha_k B; returns (pred, corr, B,
    phi_1)."""
    h = lam[k] - lam[k - 1]
    hh = -h
    phi1 = math.expm1(hh)
    big_b = math.expm1(hh)
    rks = [(lam[k - 1 - i] - lam[k - 1]) / h for i in range(1, order)] + [1.0]
    rows, b = [], []
    h_phi_k, factorial = phi1 / hh - 1.0, 1
    for i in range(1, order + 1):
        rows.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * factorial / big_b)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    r, bv = np.asarray(rows), np.asarray(b)
    # D1_i = (D_{k-1-i} - D_{k-1}) / rk_i: weight 1/rk_i on D_{k-1-i}, -1/rk_i on D_{k-1}.
    pred = np.zeros(order)
    if order >= 2:
        rho_p = np.array([0.5]) if order == 2 else np.linalg.solve(r[:-1, :-1], bv[:-1])
        for i in range(1, order):
            pred[i] += rho_p[i - 1] / rks[i - 1]
            pred[0] -= rho_p[i - 1] / rks[i - 1]
    rho_c = np.array([0.5]) if order == 1 else np.linalg.solve(r, bv)
    corr = np.zeros(order + 1)  # on D_k, D_{k-1}, ..., D_{k-p}
    for i in range(1, order):
        corr[i + 1] += rho_c[i - 1] / rks[i - 1]
        corr[1] -= rho_c[i - 1] / rks[i - 1]
    corr[0] += rho_c[-1]
    corr[1] -= rho_c[-1]
    return pred, corr, big_b, phi1


def unipc_coefficients(
    sigmas: np.ndarray, order: int, lower_order_final: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per level k (N,): the corrector x_k = cx x_pred + ca x_{k-1} + C[k] . (D_k, ..., D_{k-3})
    and the predictor x_{k+1} = pa x_k + P[k] . (D_k, D_{k-1}, D_{k-2}); at k = 0 the state is
    the start (cx = 1), at k = N-1 the prediction is D_{N-1}. Returns (cx_ca (N, 2), C (N, 4),
    pa (N,), P (N, 3)), float64."""
    n = sigmas.shape[0]
    alpha, s, _ = log_snr_steps(sigmas)
    with np.errstate(divide="ignore"):
        lam = -np.log(np.asarray(sigmas, np.float64))
    orders = step_orders(max(n - 1, 0), order, lower_order_final)
    finite_history = np.arange(n - 1) + (0 if np.isfinite(sigmas[0]) else -1) + 1
    orders = np.maximum(np.minimum(orders, np.maximum(finite_history, 1)), 1)
    cx_ca, corr = np.zeros((n, 2)), np.zeros((n, MAX_ORDER + 1))
    pa, pred = np.zeros(n), np.zeros((n, MAX_ORDER))
    cx_ca[0, 0] = 1.0
    for k in range(1, n):  # the update level k-1 -> k, predicted at k-1, corrected at k
        p = int(orders[k - 1])
        w_pred, w_corr, big_b, phi1 = _step_coefficients(lam, k, p)
        ratio = s[k] / s[k - 1]
        base = -alpha[k] * phi1  # on D_{k-1}
        pa[k - 1] = ratio
        pred[k - 1, :p] = -alpha[k] * big_b * w_pred
        pred[k - 1, 0] += base
        if not np.isfinite(sigmas[k - 1]):  # no corrector over an infinite interval
            cx_ca[k, 0] = 1.0
            continue
        cx_ca[k, 1] = ratio
        corr[k, : p + 1] = -alpha[k] * big_b * w_corr
        corr[k, 1] += base
    pred[n - 1, 0] = 1.0  # onto sigma = 0: D_{N-1}
    return cx_ca, corr, pa, pred


def _build(chain: Chain) -> Scan:
    options, dtype, bcast = chain.options, chain.dtype, chain.bcast
    cx_ca, corr, pa, pred = unipc_coefficients(
        chain.sigmas, int(options.order), bool(options.lower_order_final)
    )

    def body(carry: tuple[Array, ...], xs: tuple[Any, ...]) -> tuple[Any, tuple[Array, Array]]:
        x_prev, x_pred, d1, d2, d3 = carry
        level, cx, ca, c0, c1, c2, c3, p_a, p0, p1, p2 = xs
        d0, _ = chain.denoise(x_pred, level)
        x = (
            bcast(cx) * x_pred
            + bcast(ca) * x_prev
            + bcast(c0) * d0
            + bcast(c1) * d1
            + bcast(c2) * d2
            + bcast(c3) * d3
        )
        x_next = bcast(p_a) * x + bcast(p0) * d0 + bcast(p1) * d1 + bcast(p2) * d2
        new = tuple(v.astype(dtype) for v in (x, x_next, d0, d1, d2))
        return new, (chain.denoise.own(x_pred, level), d0)

    columns = (*cx_ca.T, *corr.T, pa, *pred.T)
    zeros = jnp.zeros_like(chain.x_init)
    init = (chain.x_init, chain.x_init, zeros, zeros, zeros)
    xs = (chain.levels(), *scan_inputs(*columns))
    return Scan(body, init, xs, lambda carry: carry[1], chain.sigmas)


SAMPLER = registry.register(
    Sampler(
        name="unipc",
        build=_build,
        options=UniPCOptions,
        min_steps=2,
        summary="UniPC-bh2 predictor-corrector (order 2 + corrector); N evaluations",
    )
)
