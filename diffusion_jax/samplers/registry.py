"""The sampler registry: name -> `Sampler`, in registration order, plus aliases.

Each sampler module registers itself at import. Everything that lists or checks samplers
(`SamplerSpec`, the runner's config checks, the docs' tables) asks the registry, so adding a
sampler is one module that calls `register`. An alias is another name for a registered
sampler: 'euler' for 'ddim', and the edm_* names of the formulation-specific samplers this
package had before every sampler ran on every formulation (`ALIASES`; kept for one release).
"""

from __future__ import annotations

from diffusion_jax.samplers.base import Sampler

_SAMPLERS: dict[str, Sampler] = {}
# alias -> registered name. DDIM with eta = 0 is the Euler step on the probability-flow ODE.
ALIASES: dict[str, str] = {"euler": "ddim"}
# Old names that are only kept working, and where they are documented as such.
DEPRECATED_ALIASES: dict[str, str] = {
    "edm_euler": "ddim",
    "edm_heun": "heun",
    "edm_stochastic": "heun",
    "edm_dpm_solver++": "dpm_solver++",
    "edm_dpm_solver++2m_sde": "dpm_solver++2m_sde",
}


def register(sampler: Sampler) -> Sampler:
    """Add `sampler` under `sampler.name` (a ValueError if taken); returns it."""
    if not isinstance(sampler.name, str) or not sampler.name:
        raise ValueError(f"a sampler name must be a non-empty str; got {sampler.name!r}")
    if sampler.name in _SAMPLERS or sampler.name in ALIASES or sampler.name in DEPRECATED_ALIASES:
        raise ValueError(f"sampler {sampler.name!r} is already registered; unregister it first")
    if sampler.min_steps < 1:
        raise ValueError(f"min_steps must be >= 1; got {sampler.min_steps}")
    _SAMPLERS[sampler.name] = sampler
    return sampler


def unregister(name: str) -> Sampler:
    """Remove the sampler `name` (a ValueError if unknown); returns it."""
    if name not in _SAMPLERS:
        raise ValueError(f"no sampler {name!r} is registered; registered: {names()}")
    return _SAMPLERS.pop(name)


def canonical_name(name: str) -> str:
    """The registered name of `name` (itself, or what its alias stands for); ValueError
    listing the choices if unknown."""
    if isinstance(name, str):
        name = ALIASES.get(name, DEPRECATED_ALIASES.get(name, name))
    if not isinstance(name, str) or name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; use one of {names()}")
    return name


def get_sampler(name: str) -> Sampler:
    """The sampler registered as `name` (or an alias of it); ValueError listing the choices."""
    return _SAMPLERS[canonical_name(name)]


def names() -> tuple[str, ...]:
    """The registered sampler names, in registration order."""
    return tuple(_SAMPLERS)


def all_names() -> tuple[str, ...]:
    """Every accepted name: the registered ones, then the aliases."""
    return (*_SAMPLERS, *ALIASES, *DEPRECATED_ALIASES)


def registered() -> tuple[Sampler, ...]:
    """The registered samplers, in registration order."""
    return tuple(_SAMPLERS.values())
