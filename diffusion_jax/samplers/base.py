"""The sampler interface: what a sampler module registers (`Sampler`), what it is handed to
build its scan (`Chain`) and what it returns (`Scan`).

A sampler visits N integer timesteps tau_0 > ... > tau_{N-1} = 0 and evaluates the model only
in the body of one `lax.scan`, so the model appears once in the traced graph and compile time
does not grow with N. Per-step coefficients are computed before tracing, in float64 numpy from
a concrete schedule (`array_module` lets the same code run on a traced schedule's jax arrays),
and enter the scan as inputs (`scan_inputs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.samplers.denoise import Denoiser, EDMDenoiser
from diffusion_jax.samplers.noise import Noise

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """The `sample` options a sampler may read (each is a `sample` keyword and a
    `SamplerSpec` field). temperature scales injected noise; learn_sigma says the model
    outputs its variance too."""

    eta: float = 0.0
    variance: str = "fixed_small"
    lower_order_final: bool = True
    temperature: Any = 1.0
    learn_sigma: bool = False
    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = float("inf")
    s_noise: float = 1.0


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SamplerOptions))


@dataclasses.dataclass(frozen=True)
class Option:
    """A `SamplerOptions` field that a sampler reads.

    default: the value that leaves it out of file names (`SamplerSpec.name`); label(value): its
    file-name part otherwise. check(value, options) raises ValueError for a bad value; it runs
    whichever sampler is chosen, since `sample` takes every option and a bad one is a mistake
    even where it is ignored.
    """

    name: str
    default: Any
    label: Callable[[Any], str]
    check: Callable[[Any, SamplerOptions], None] | None = None


@dataclasses.dataclass(frozen=True)
class Chain:
    """What a sampler builds its scan from: the N timesteps it visits and their
    alphas_cumprod, the start x (B, ...) at timesteps[0], the model, the per-sample noise
    (draw step k's from index k + 1) and the options.

    An EDM-formulation chain (samplers registered with formulation='edm') visits the noise
    levels `sigmas` (float64 (N,), decreasing, > 0; then onto sigma = 0) instead: its
    `timesteps` are the step indices N-1..0, alphas_cumprod is 1 / (1 + sigma^2), `ts` gives
    the sigmas, and `denoise(x, sigma)` is the EDM denoiser (`EDMDenoiser`)."""

    timesteps: np.ndarray  # int64 (N,), strictly decreasing
    alphas_cumprod: Any  # (N,) float64 numpy; a jax array when the schedule is traced
    x_init: Array
    denoise: Denoiser | EDMDenoiser  # (x, timestep | sigma) -> (x0, eps)
    noise: Noise
    options: SamplerOptions
    sigmas: np.ndarray | None = None

    @property
    def dtype(self) -> Any:
        return self.denoise.dtype

    @property
    def steps(self) -> Array:
        """int32 (N,) step indices 0..N-1, a scan input for the noise index."""
        return jnp.arange(self.timesteps.shape[0], dtype=jnp.int32)

    @property
    def ts(self) -> Array:
        """int32 (N,) timesteps, a scan input (an edm chain: its sigmas, float)."""
        if self.sigmas is not None:
            return jnp.asarray(self.sigmas, dtype=diffusion.float_dtype())
        return jnp.asarray(self.timesteps, dtype=jnp.int32)

    def bcast(self, c: Array) -> Array:
        """A per-step scalar as (1, ..., 1), to scale x (B, ...)."""
        return c.astype(self.dtype).reshape((1,) * len(self.denoise.shape))


class Scan(NamedTuple):
    """A sampler's `lax.scan`: out = result(scan(body, init, xs)[0]).

    body(carry, x) -> (carry, (x_t, x0_pred)): the model input and (clipped) x0 prediction of
    its one model evaluation, recorded for `Trajectory`. eval_timesteps: int (K,) the timestep
    of each evaluation.
    """

    body: Callable[[Any, Any], tuple[Any, tuple[Array, Array]]]
    init: Any
    xs: Any
    result: Callable[[Any], Array]
    eval_timesteps: Any


def _one_per_step(num_steps: int) -> int:
    return num_steps


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A registered sampler (`registry.register`).

    name: the `sampler=` value. build(chain) -> Scan. options: the `SamplerOptions` it reads.
    ode: integrates the probability-flow ODE from T-1 to 0 (listed in ODE_SAMPLERS);
    min_steps: the fewest timesteps it works with. num_evaluations(N): model evaluations
    (= trajectory length K). check_on_schedule(ab (N,) float64 on its timesteps, options):
    raises ValueError for options the schedule's values rule out (`validate_on_schedule`;
    `build` raises the same for a concrete schedule). formulation: the model it samples,
    'ddpm' (integer timesteps of a `Schedule`) or 'edm' (noise levels sigma of an `edm.EDM`,
    Karras et al. 2022); `sample` refuses the other.
    """

    name: str
    build: Callable[[Chain], Scan]
    options: tuple[Option, ...] = ()
    ode: bool = False
    min_steps: int = 1
    num_evaluations: Callable[[int], int] = _one_per_step
    check_on_schedule: Callable[[Any, SamplerOptions], None] | None = None
    formulation: str = "ddpm"


def array_module(arr: Any) -> Any:
    """numpy for float64 numpy coefficients, jax.numpy for a traced schedule's."""
    return np if isinstance(arr, np.ndarray) else jnp


def next_alphas_cumprod(ab: Any) -> Any:
    """ab at tau_{k+1} for each step k, with clean data (ab = 1) after the last step."""
    xp = array_module(ab)
    return xp.concatenate([ab[1:], xp.ones((1,), dtype=ab.dtype)])


def scan_inputs(*arrays: Any) -> tuple[Array, ...]:
    """Per-step coefficients (float64 numpy) as scan inputs of the default float dtype."""
    dtype = diffusion.float_dtype()
    return tuple(jnp.asarray(a, dtype=dtype) for a in arrays)
