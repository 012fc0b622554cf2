"""The sampler registry: name -> `Sampler`, in registration order.

Each sampler module registers itself at import (the package imports the built-in ones in the
order ddpm, ddim, dpm_solver++, heun). Everything that lists or checks samplers (argument
validation, `SamplerSpec`, the runner's config checks) asks the registry, so adding a sampler
is one module that calls `register`.
"""

from __future__ import annotations

from diffusion_jax.samplers.base import OPTION_NAMES, Sampler

_SAMPLERS: dict[str, Sampler] = {}


def register(sampler: Sampler) -> Sampler:
    """Add `sampler` under `sampler.name` (a ValueError if taken); returns it."""
    if not isinstance(sampler.name, str) or not sampler.name:
        raise ValueError(f"a sampler name must be a non-empty str; got {sampler.name!r}")
    if sampler.name in _SAMPLERS:
        raise ValueError(f"sampler {sampler.name!r} is already registered; unregister it first")
    unknown = [o.name for o in sampler.options if o.name not in OPTION_NAMES]
    if unknown:
        raise ValueError(
            f"sampler {sampler.name!r} reads unknown options {unknown}; use {OPTION_NAMES}"
        )
    if sampler.formulation not in ("ddpm", "edm"):
        raise ValueError(f"formulation must be 'ddpm' or 'edm'; got {sampler.formulation!r}")
    if sampler.min_steps < 1:
        raise ValueError(f"min_steps must be >= 1; got {sampler.min_steps}")
    _SAMPLERS[sampler.name] = sampler
    return sampler


def unregister(name: str) -> Sampler:
    """Remove the sampler `name` (a ValueError if unknown); returns it."""
    get_sampler(name)
    return _SAMPLERS.pop(name)


def get_sampler(name: str) -> Sampler:
    """The sampler registered as `name`; ValueError listing the registered names if none."""
    if not isinstance(name, str) or name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; use one of {names()}")
    return _SAMPLERS[name]


def names(formulation: str | None = None) -> tuple[str, ...]:
    """The registered sampler names, in registration order (those of `formulation` only if
    given)."""
    return tuple(n for n, s in _SAMPLERS.items() if formulation in (None, s.formulation))


def registered() -> tuple[Sampler, ...]:
    """The registered samplers, in registration order."""
    return tuple(_SAMPLERS.values())
