"""The multistep DPM-Solver++ family (Lu et al. 2022), with data (x0) prediction, on the grid:

    dpm_solver++        DPM-Solver++(2M), second order;
    dpm_solver++3m      DPM-Solver++(3M), third order;
    dpm_solver++2m_sde  DPM-Solver++(2M) SDE, the stochastic solver (injects noise each step).

In lambda = -log sigma (= log(alpha / s) of the x_vp coordinates; the solvers' updates are the
same in any scaling of x, so one set of coefficients serves every formulation). The first steps
are of the order their history allows (1, then 2, then 3); a step from sigma = inf (flow's
t = 1) has h = inf and gives the previous derivative weight 0. With lower_order_final
(default) the update onto the last level is first order (the DDIM step in data prediction)
and, for 3M, the one before at most second order, as in the DPM-Solver reference code (below
10 steps) and diffusers (below 15 steps, or whenever its last step goes to sigma = 0); here it
applies for every N, because on 1000-step schedules the last interval (onto t = 0) spans a long
log-SNR range at any N up to ~100. The last step returns the x0 prediction at the last level.
N model evaluations.

Accuracy (benchmarks/sampler_gaussian_error.py, exact Gaussian model, ddpm 'linspace' grids):
pure 2M (lower_order_final=False) is second order in the number of steps. With few steps the
last interval of uniform-in-t timesteps spans a large log-SNR range (lambda(t = 0) ~ 4.6 for
'linear'), where the 2M correction extrapolates the x0 predictions badly (worse than ddim at
11-21 steps). lower_order_final avoids that: its error is below ddim's at every N benchmarked
(about equal at 6 steps, 1.4-3x less at 11, 3-45x less at 21; 'linear' / 'cosine') and below
pure 2M's from 11 steps on (2-56x less), though pure 2M is better at 6 steps on 'linear'. With
num_steps = 3 and lower_order_final, dpm_solver++ equals ddim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import registry
from diffusion_jax.samplers.base import Chain, Sampler, Scan, option, scan_inputs, vp_coefficients

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DPMSolverOptions:
    """lower_order_final: take the update onto the last level at first order (default; much
    more accurate with few steps); False is the pure multistep solver."""

    lower_order_final: bool = option(True, lambda value: "pure2m")

    def check(self) -> None:
        if not isinstance(self.lower_order_final, (bool, np.bool_)):
            raise ValueError(f"lower_order_final must be a bool; got {self.lower_order_final!r}")


def log_snr_steps(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """alpha, s (N,) of x_vp at the levels and h (N-1,) = lambda_{k+1} - lambda_k with
    lambda = -log sigma (h = inf from sigma = inf)."""
    alpha, s = vp_coefficients(sigmas)
    with np.errstate(divide="ignore"):
        lam = -np.log(np.asarray(sigmas, np.float64))
    return alpha, s, lam[1:] - lam[:-1]


def step_orders(num_updates: int, max_order: int, lower_order_final: bool) -> np.ndarray:
    """int (num_updates,): the order of each update, min(max_order, k + 1) (the history it
    has), and with lower_order_final at most num_updates - k (the update onto the last
    timestep is first order, the one before at most second)."""
    k = np.arange(num_updates)
    orders = np.minimum(max_order, k + 1)
    return np.minimum(orders, num_updates - k) if lower_order_final else orders


# h = inf (a step from sigma = inf) makes some unused branches of np.where inf or nan.
@np.errstate(divide="ignore", invalid="ignore", over="ignore")
def multistep_coefficients(
    alpha: Any, sigma: Any, h: Any, lower_order_final: bool = True, max_order: int = 2
) -> tuple[Any, Any, Any, Any]:
    """DPM-Solver++(2M) (max_order 2) or (3M) (max_order 3) from alpha, sigma (N,) of x at the
    levels and h (N-1,) = lambda_{k+1} - lambda_k, lambda = log(alpha / sigma):
    x_next = A x + B D_k + C D_{k-1} + E D_{k-2}, each (N,), D = x0 predictions.

    Step k goes level k -> k + 1 at the order of `step_orders`; the last (k = N-1) returns
    D_{N-1}. With r0 = h_{k-1} / h_k, r1 = h_{k-2} / h_k and phi_1 = 1 - e^{-h} (Lu et al.
    2022, the multistep DPM-Solver++ of their reference code), A = sigma_{k+1} / sigma_k and
      order 1: x_next = A x + alpha phi_1 D with D = D_k (the DDIM step);
      order 2: the same with D = D_k + (D_k - D_{k-1}) / (2 r0);
      order 3: D1 = (1 + w) (D_k - D_{k-1}) / r0 - w (D_{k-1} - D_{k-2}) / r1, w = r0 / (r0 + r1),
               D2 = ((D_k - D_{k-1}) / r0 - (D_{k-1} - D_{k-2}) / r1) / (r0 + r1),
               x_next = A x + alpha (phi_1 D_k + phi_2 D1 - 2 phi_3 D2),
               phi_2 = (e^{-h} - 1) / h + 1, phi_3 = (e^{-h} - 1 + h) / h^2 - 1/2.
    D1 and D2 estimate h D'(lambda) and h^2 D''(lambda) / 2, so the order-3 update integrates a
    quadratic D(lambda) exactly (tested), which needs the weight 2 phi_3 on D2.
    """
    orders = step_orders(h.shape[0], max_order, lower_order_final)
    a_next = alpha[1:]
    em1 = np.expm1(-h)
    phi1 = -em1
    phi2 = em1 / h + 1.0
    phi3 = (em1 + h) / (h * h) - 0.5
    one = np.ones((1,), dtype=h.dtype)
    # r0, r1 (1 where there is no history; those terms get weight 0 below).
    h_prev = np.concatenate([one, h[:-1]])
    h_prev2 = np.concatenate([one, one, h[:-2]])[: h.shape[0]]
    r0, r1 = h_prev / h, h_prev2 / h
    w = r0 / (r0 + r1)
    b2, c2 = phi1 * (1.0 + 0.5 / r0), -phi1 * 0.5 / r0
    b3 = phi1 + phi2 * (1.0 + w) / r0 - 2.0 * phi3 / (r0 * (r0 + r1))
    c3 = -phi2 * ((1.0 + w) / r0 + w / r1) + 2.0 * phi3 / (r0 + r1) * (1.0 / r0 + 1.0 / r1)
    e3 = phi2 * w / r1 - 2.0 * phi3 / (r1 * (r0 + r1))
    b = np.where(orders == 1, phi1, np.where(orders == 2, b2, b3)) * a_next
    c = np.where(orders == 1, 0.0, np.where(orders == 2, c2, c3)) * a_next
    e = np.where(orders == 3, e3, 0.0) * a_next
    zero = np.zeros((1,), dtype=h.dtype)
    return (
        np.concatenate([sigma[1:] / sigma[:-1], zero]),
        np.concatenate([b, one]),
        np.concatenate([c, zero]),
        np.concatenate([e, zero]),
    )


@np.errstate(divide="ignore", invalid="ignore", over="ignore")
def multistep_sde_coefficients(
    alpha: Any, sigma: Any, h: Any, lower_order_final: bool = True
) -> tuple[Any, Any, Any, Any]:
    """DPM-Solver++(2M) SDE (Lu et al. 2022; diffusers' 'sde-dpmsolver++' midpoint form) from
    alpha, sigma (N,) and h (N-1,) as `multistep_coefficients`:
    x_next = A x + B D_k + C D_{k-1} + Z z, z ~ N(0, I):
      A = (sigma_{k+1} / sigma_k) e^{-h}, phi = 1 - e^{-2h},
      order 1: B = alpha_{k+1} phi;  order 2: B = alpha_{k+1} phi (1 + 1 / (2 r0)),
      C = -alpha_{k+1} phi / (2 r0);  Z = sigma_{k+1} sqrt(phi).
    The last (k = N-1) returns D_{N-1}."""
    orders = step_orders(h.shape[0], 2, lower_order_final)
    phi = -np.expm1(-2.0 * h)
    one, zero = np.ones((1,), dtype=h.dtype), np.zeros((1,), dtype=h.dtype)
    r0 = np.concatenate([one, h[:-1]]) / h
    w_prev = np.where(orders == 1, 0.0, 0.5 / r0)
    return (
        np.concatenate([sigma[1:] / sigma[:-1] * np.exp(-h), zero]),
        np.concatenate([alpha[1:] * phi * (1.0 + w_prev), one]),
        np.concatenate([-alpha[1:] * phi * w_prev, zero]),
        np.concatenate([sigma[1:] * np.sqrt(phi), zero]),
    )


def multistep_scan(chain: Chain, a: Any, b: Any, c: Any, e: Any, z: Any | None) -> Scan:
    """The scan of x_next = a x + b D_k + c D_{k-1} + e D_{k-2} (+ z * temperature * noise)."""
    dtype, bcast, temperature = chain.dtype, chain.bcast, chain.temperature
    stochastic = z is not None
    z = np.zeros_like(a) if z is None else z

    def body(carry: tuple[Array, ...], xs: tuple[Any, ...]) -> tuple[Any, tuple[Array, Array]]:
        x, d_prev, d_prev2 = carry
        k, level, ca, cb, cc, ce, cz = xs
        d, _ = chain.denoise(x, level)
        x_next = bcast(ca) * x + bcast(cb) * d + bcast(cc) * d_prev + bcast(ce) * d_prev2
        if stochastic:
            x_next = x_next + bcast(cz) * temperature * chain.noise(k + 1)
        return (x_next.astype(dtype), d, d_prev), (chain.denoise.own(x, level), d)

    zeros = jnp.zeros_like(chain.x_init)
    xs = (chain.steps, chain.levels(), *scan_inputs(a, b, c, e, z))
    return Scan(body, (chain.x_init, zeros, zeros), xs, lambda carry: carry[0], chain.sigmas)


def _build(max_order: int, sde: bool) -> Any:
    def build(chain: Chain) -> Scan:
        lower_order_final = bool(chain.options.lower_order_final)
        alpha, s, h = log_snr_steps(chain.sigmas)
        if sde:
            a, b, c, z = multistep_sde_coefficients(alpha, s, h, lower_order_final)
            return multistep_scan(chain, a, b, c, np.zeros_like(a), z)
        coefficients = multistep_coefficients(alpha, s, h, lower_order_final, max_order)
        return multistep_scan(chain, *coefficients, None)

    return build


SAMPLER = registry.register(
    Sampler(
        name="dpm_solver++",
        build=_build(2, sde=False),
        options=DPMSolverOptions,
        min_steps=2,
        summary="DPM-Solver++(2M); N evaluations",
    )
)
SAMPLER_3M = registry.register(
    Sampler(
        name="dpm_solver++3m",
        build=_build(3, sde=False),
        options=DPMSolverOptions,
        min_steps=2,
        summary="DPM-Solver++(3M); N evaluations",
    )
)
SAMPLER_SDE = registry.register(
    Sampler(
        name="dpm_solver++2m_sde",
        build=_build(2, sde=True),
        options=DPMSolverOptions,
        min_steps=2,
        stochastic=lambda options: True,
        summary="DPM-Solver++(2M) SDE; N evaluations, stochastic",
    )
)
