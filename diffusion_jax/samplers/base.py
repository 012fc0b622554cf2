"""The sampler interface: what a sampler module registers (`Sampler`), what it builds its scan
from (`Chain`) and what it returns (`Scan`).

Every sampler is written once, on the denoiser D of any formulation over a decreasing grid of
noise levels sigma_0 > ... > sigma_{N-1} > 0 (`grid`), ending with the step onto sigma = 0
whose result is the x0 prediction D(x; sigma_{N-1}). The state x is in the variance-preserving
coordinates x_vp = alpha x0 + s n (alpha = 1 / sqrt(1 + sigma^2), s = sigma alpha;
`formulations.base`), finite even at sigma = inf. The model appears once, in the body of one
`lax.scan`, so compile time does not grow with N. Per-step coefficients are computed before
tracing, in float64 numpy from the grid, and enter the scan as inputs (`scan_inputs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.formulations import Formulation, vp_alpha, vp_noise
from diffusion_jax.guidance import EVERYWHERE, Guidance, in_interval
from diffusion_jax.samplers.noise import Noise

Array = jax.Array


class Level(NamedTuple):
    """Where the network is evaluated: sigma, the scale from x_vp to the formulation's own
    coordinates, the network's time input and whether guidance applies there (`guidance`).
    Scalars in a scan body; (K,) as scan inputs."""

    sigma: Array
    scale: Array
    time: Array
    guided: Array

    @classmethod
    def at(
        cls,
        formulation: Formulation,
        sigmas: np.ndarray,
        interval: tuple[float, float] = EVERYWHERE,
    ) -> Level:
        """Scan inputs (K,) for evaluations at `sigmas`, rounded onto a discrete model's
        levels; guided where the rounded level lies in the guidance `interval` (decided in
        float64, before tracing)."""
        sig = formulation.round_sigma(sigmas)
        dtype = diffusion.float_dtype()
        return cls(
            sigma=jnp.asarray(sig, dtype),
            scale=jnp.asarray(formulation.scale(sig), dtype),
            time=jnp.asarray(formulation.time(sig)),
            guided=jnp.asarray(in_interval(sig, interval)),
        )


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """D at one level: net (labels bound in) through the formulation, guided where `guidance`
    says (`guidance.bind`), from x_vp (B, ...) to the x0 prediction (clipped to [-1, 1] with
    clip_x0, after guidance) and, for a learned-variance model, its variance values (else
    None)."""

    net: Callable[[Array, Array], Array]
    formulation: Formulation
    shape: tuple[int, ...]
    clip_x0: bool
    dtype: Any
    guidance: Guidance | None = None

    @property
    def interval(self) -> tuple[float, float]:
        """The levels guided (every level when unguided: then nothing differs)."""
        return EVERYWHERE if self.guidance is None else self.guidance.interval

    def __call__(self, x: Array, level: Level) -> tuple[Array, Array | None]:
        x_own = self.own(x, level)
        x0, var_values = self._denoised(x_own, level)
        if x0.shape != self.shape:
            raise ValueError(f"model_fn returned shape {x0.shape}; expected {self.shape}")
        if self.clip_x0:
            x0 = jnp.clip(x0, -1.0, 1.0)
        return x0.astype(self.dtype), var_values

    def own(self, x: Array, level: Level) -> Array:
        """x_vp in the formulation's own coordinates (what the network sees)."""
        return (x * level.scale.astype(self.dtype)).astype(self.dtype)

    def _denoised(self, x: Array, level: Level) -> tuple[Array, Array | None]:
        formulation, guidance = self.formulation, self.guidance

        def plain(x: Array) -> tuple[Array, Array | None]:
            return formulation.denoised(self.net, x, level.sigma, level.time)

        if guidance is None:
            return plain(x)

        def guided(x: Array) -> tuple[Array, Array | None]:
            return guidance.denoised(formulation, x, level.sigma, level.time)

        if guidance.everywhere:
            return guided(x)
        # Outside the interval only the model runs (one network evaluation, not two).
        return jax.lax.cond(level.guided, guided, plain, x)


@dataclasses.dataclass(frozen=True)
class Chain:
    """What a sampler builds its scan from: the grid `sigmas` (float64 (N,), decreasing, > 0;
    the first may be inf), the start x_vp (B, ...) at sigmas[0], the denoiser, the per-sample
    noise (draw step k's from index k + 1), the sampler's options and the temperature that
    scales injected noise."""

    sigmas: np.ndarray
    x_init: Array
    denoise: Denoiser
    noise: Noise
    options: Any
    temperature: Any

    @property
    def formulation(self) -> Formulation:
        return self.denoise.formulation

    @property
    def dtype(self) -> Any:
        return self.denoise.dtype

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.shape[0])

    @property
    def steps(self) -> Array:
        """int32 (N,) step indices 0..N-1, a scan input for the noise index."""
        return jnp.arange(self.num_steps, dtype=jnp.int32)

    def levels(self, sigmas: np.ndarray | None = None) -> Level:
        """Scan inputs (K,) for evaluations at `sigmas` (default: the grid), rounded onto a
        discrete model's levels."""
        return Level.at(
            self.formulation, self.sigmas if sigmas is None else sigmas, self.denoise.interval
        )

    def bcast(self, c: Array) -> Array:
        """A per-step scalar as (1, ..., 1), to scale x (B, ...)."""
        return c.astype(self.dtype).reshape((1,) * len(self.denoise.shape))


class Scan(NamedTuple):
    """A sampler's `lax.scan`: out = result(scan(body, init, xs)[0]).

    body(carry, x) -> (carry, (x_own, x0_pred)): the network input (own coordinates) and the
    (clipped) x0 prediction of its one model evaluation, recorded for `Trajectory`.
    eval_sigmas: float64 (K,) the level of each evaluation.
    """

    body: Callable[[Any, Any], tuple[Any, tuple[Array, Array]]]
    init: Any
    xs: Any
    result: Callable[[Any], Array]
    eval_sigmas: np.ndarray


def _one_per_step(num_steps: int) -> int:
    return num_steps


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a sampler that has none."""


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A registered sampler (`registry.register`).

    name: the `sampler=` value. build(chain) -> Scan. options: its frozen options dataclass
    (defaults = its fields' defaults; each field's metadata 'label' gives its file-name part
    where not the default; an optional `check()` raises ValueError naming the fix).
    min_steps: the fewest grid levels it works with; num_evaluations(N): model evaluations
    (= trajectory length K). finite_start: its first step needs a finite sigma_0.
    check_grid(sigmas, options): raises ValueError for options the grid's values rule out.
    stochastic(options): whether it injects noise (temperature applies).
    default_spacing: its own good grid where the formulation's default
    (`Formulation.default_spacing`) does not suit it ('' = none; used when timestep_spacing
    is '').
    """

    name: str
    build: Callable[[Chain], Scan]
    options: type = NoOptions
    min_steps: int = 1
    num_evaluations: Callable[[int], int] = _one_per_step
    finite_start: bool = False
    check_grid: Callable[[np.ndarray, Any], None] | None = None
    stochastic: Callable[[Any], bool] = lambda options: False
    default_spacing: str = ""
    summary: str = ""


def vp_coefficients(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, s) float64 (N,) of the grid: the x_vp scale of x0 and of the noise."""
    return vp_alpha(sigmas), vp_noise(sigmas)


def scan_inputs(*arrays: Any) -> tuple[Array, ...]:
    """Per-step coefficients (float64 numpy) as scan inputs of the default float dtype."""
    dtype = diffusion.float_dtype()
    return tuple(jnp.asarray(a, dtype=dtype) for a in arrays)


def option_labels(options: Any) -> list[str]:
    """The file-name parts of the options that differ from their defaults, in field order."""
    parts = []
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        if value != field.default and "label" in field.metadata:
            parts.append(field.metadata["label"](value))
    return parts


def option(default: Any, label: Callable[[Any], str]) -> Any:
    """A sampler option field: its default and its file-name label."""
    return dataclasses.field(default=default, metadata={"label": label})
