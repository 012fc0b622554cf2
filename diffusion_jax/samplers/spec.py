"""`SamplerSpec`: a sampler, its grid and its options in one value, built once per mode and
validated once; and the file-name stem that names it.

    spec = SamplerSpec(sampler='ddim', num_steps=50, options=DDIMOptions(eta=0.5))
    spec = SamplerSpec.create(sampler='ddim', num_steps=50, eta=0.5)   # the same, flat
    spec.validate(formulation)
    x0 = spec.sample(model_fn, formulation, shape, rng)

A sampler's own options are a frozen dataclass in its module (`Sampler.options`); the spec holds
an instance of the chosen sampler's. Everything else here applies to every sampler: the grid
(timestep_spacing, num_steps, sigma_min, sigma_max, rho), clip_x0, the temperature of injected
noise, classifier-free guidance and the Gaussian start. Adding an option is a field in one
sampler module (and its default in configs/default.py, for the command line).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from diffusion_jax import guidance
from diffusion_jax.formulations import Formulation
from diffusion_jax.samplers import driver, grid, registry, spacing
from diffusion_jax.samplers.base import Sampler, option_labels
from diffusion_jax.values import is_int, is_real

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Every sampling choice in one hashable value.

    sampler: a registered name or alias (stored as the registered name). num_steps: grid
    levels N. timestep_spacing: `grid.SPACINGS`, '' = the sampler's default grid for the
    formulation (`default_spacing`). sigma_min, sigma_max, rho: the 'karras' / 'logsnr' range
    (a discrete model's lowest level replaces sigma_min; 'linspace' on edm ends at sigma_max).
    options: the sampler's options (None = its defaults). clip_x0: clip every x0 prediction to
    [-1, 1]. temperature: scales injected noise (stochastic samplers). guidance_scale: w of
    D_guide + w (D - D_guide), 1 = unguided; the guide is the unconditional model (null label
    num_classes) or a guide network (autoguidance, `sample(..., guide_fn=)`).
    guidance_interval: (lo, hi], the levels guided (default: every level). gaussian_start_t (a
    discrete model's timestep) or gaussian_start_sigma (any model's level): > 0 replaces the
    chain above that level by the exact flow of the data's Gaussian model.
    """

    sampler: str = "ddim"
    num_steps: int = 50
    timestep_spacing: str = ""
    sigma_min: float = spacing.SIGMA_MIN
    sigma_max: float = spacing.SIGMA_MAX
    rho: float = spacing.RHO
    options: Any = None
    clip_x0: bool = True
    temperature: float = 1.0
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] = guidance.EVERYWHERE
    num_classes: int | None = None
    gaussian_start_t: int = 0
    gaussian_start_sigma: float = 0.0

    def __post_init__(self) -> None:
        entry = registry.get_sampler(self.sampler)
        object.__setattr__(self, "sampler", entry.name)
        if isinstance(self.guidance_interval, list | tuple):  # hashable, as the spec must be
            object.__setattr__(self, "guidance_interval", tuple(self.guidance_interval))
        if self.options is None:
            object.__setattr__(self, "options", entry.options())
        elif not isinstance(self.options, entry.options):
            raise ValueError(
                f"sampler {entry.name!r} takes {entry.options.__name__}; got "
                f"{type(self.options).__name__}"
            )

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, **values: Any) -> SamplerSpec:
        """A spec from flat keywords: spec fields and the chosen sampler's option fields."""
        return cls().replace(**values)

    @classmethod
    def from_config(cls, config: Any, num_classes: int | None = None) -> SamplerSpec:
        """From a run config's `sampling` section (any mapping with one, e.g. an ml_collections
        ConfigDict): every spec field and option field of the chosen sampler it has."""
        s = config.sampling
        entry = registry.get_sampler(s.sampler)
        values = {f: s[f] for f in _spec_fields() if f not in ("options", "num_classes") and f in s}
        if "guidance_interval" in values and not values["guidance_interval"]:
            values["guidance_interval"] = guidance.EVERYWHERE  # () in a config: every level
        option_values = {f: s[f] for f in _field_names(entry.options) if f in s}
        values["options"] = entry.options(**option_values)
        return cls(**values, num_classes=num_classes)

    def replace(self, **changes: Any) -> SamplerSpec:
        """A copy with `changes`: spec fields and option fields by name. A new sampler keeps
        the options of the old one that it shares (e.g. lower_order_final)."""
        entry = registry.get_sampler(changes.get("sampler", self.sampler))
        option_names = _field_names(entry.options)
        spec_names = _spec_fields()
        unknown = sorted(set(changes) - set(option_names) - set(spec_names))
        if unknown:
            raise ValueError(
                f"unknown sampler options {unknown} for {entry.name!r}; it takes "
                f"{sorted(option_names)} and {sorted(spec_names - {'options'})}"
            )
        options = changes.get("options")
        if options is None:
            kept = {f: getattr(self.options, f) for f in _field_names(type(self.options))}
            kept = {k: v for k, v in kept.items() if k in option_names}
            options = entry.options(
                **{**kept, **{k: changes[k] for k in option_names & changes.keys()}}
            )
        own = {k: v for k, v in changes.items() if k in spec_names - {"options", "sampler"}}
        return dataclasses.replace(self, **own, sampler=entry.name, options=options)

    def choose(self, **choices: Any) -> SamplerSpec:
        """`replace`, where options of registered samplers other than the (new) chosen one are
        accepted and dropped, as a config holds every sampler's options (`choice_names`)."""
        entry = registry.get_sampler(choices.get("sampler", self.sampler))
        others = choice_names() - _spec_fields() - _field_names(entry.options)
        return self.replace(**{k: v for k, v in choices.items() if k not in others})

    # -- what it means -----------------------------------------------------------------------
    @property
    def entry(self) -> Sampler:
        return registry.get_sampler(self.sampler)

    @property
    def num_evaluations(self) -> int:
        """Model evaluations of one sample (each guided one is a doubled batch)."""
        return int(self.entry.num_evaluations(self.num_steps))

    @property
    def guided(self) -> bool:
        """Whether guidance applies (a scale other than 1, with a guide or labels)."""
        return self.guidance_scale != 1.0

    def network_evaluations(self, formulation: Formulation) -> int:
        """Network evaluations per sample: one per model evaluation, and one more for each
        guided one (the guide's: a doubled batch, or a second network)."""
        everywhere = self.guidance_interval == guidance.EVERYWHERE
        if not self.guided or (self.guidance_scale == 0.0 and everywhere):
            return self.num_evaluations
        levels = driver.evaluation_sigmas(self, formulation)
        return len(levels) + int(np.sum(guidance.in_interval(levels, self.guidance_interval)))

    def spacing_for(self, formulation: Formulation) -> str:
        """timestep_spacing, or the sampler's default grid for this formulation ('')."""
        if self.timestep_spacing:
            return self.timestep_spacing
        return default_spacing(self.sampler, formulation)

    def start_sigma(self, formulation: Formulation) -> float | None:
        """The level a Gaussian start begins the network's chain at (None: off)."""
        levels = formulation.levels
        if self.gaussian_start_t:
            assert levels is not None  # validated
            return float(levels[self.gaussian_start_t])
        if self.gaussian_start_sigma:
            return float(formulation.round_sigma(np.asarray(self.gaussian_start_sigma)))
        return None

    def grid(self, formulation: Formulation, start_sigma: float | None = None) -> np.ndarray:
        """The levels (N,) visited; start_sigma: a chain started part-way (SDEdit)."""
        return grid.sigma_grid(
            formulation,
            self.num_steps,
            self.spacing_for(formulation),
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            rho=self.rho,
            start_sigma=start_sigma,
        )

    def validate(self, formulation: Formulation, start_sigma: float | None = None) -> None:
        """Raise ValueError naming the fix for any bad choice, including those the grid's
        values rule out (a DDIM eta too large, heun from sigma = inf), before anything is
        traced."""
        entry = self.entry
        if not is_int(self.num_steps) or self.num_steps < entry.min_steps:
            raise ValueError(
                f"num_steps must be an integer >= {entry.min_steps} for sampler "
                f"{self.sampler!r}; got {self.num_steps!r}"
            )
        levels = formulation.levels
        if levels is not None and self.num_steps > len(levels):
            raise ValueError(
                f"num_steps must be an integer in [1, {len(levels)}] (the schedule's T); "
                f"got {self.num_steps!r}"
            )
        grid.check_spacing(formulation, self.spacing_for(formulation))
        spacing.check_sigma_range(self.sigma_min, self.sigma_max, self.rho)
        _check(self.options, formulation)
        if not isinstance(self.clip_x0, (bool, np.bool_)):
            raise ValueError(f"clip_x0 must be a bool; got {self.clip_x0!r}")
        if is_real(self.temperature) and not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature!r}")
        guidance.check_interval(self.guidance_interval)
        start = self._check_gaussian_start(formulation, start_sigma)
        sigmas = self.grid(formulation, start if start is not None else start_sigma)
        if entry.check_grid is not None:
            entry.check_grid(sigmas, self.options)

    def _check_gaussian_start(
        self, formulation: Formulation, start_sigma: float | None
    ) -> float | None:
        t, sigma = self.gaussian_start_t, self.gaussian_start_sigma
        levels = formulation.levels
        if t:
            if levels is None:
                raise ValueError(
                    "gaussian_start_t is a timestep of a discrete schedule; for the "
                    f"{formulation.name} formulation set gaussian_start_sigma instead"
                )
            if not is_int(t) or not 0 <= t < len(levels):
                raise ValueError(
                    f"gaussian_start_t must be an integer in [0, {len(levels) - 1}] (0 = off); "
                    f"got {t!r}"
                )
            if self.num_steps > t + 1:
                raise ValueError(
                    f"num_steps={self.num_steps} exceeds the {t + 1} timesteps from "
                    f"gaussian_start_t={t} to 0; lower num_steps or raise gaussian_start_t"
                )
        if not is_real(sigma) or not 0.0 <= sigma < math.inf:
            raise ValueError(
                f"gaussian_start_sigma must be a finite number >= 0 (0 = off); got {sigma!r}"
            )
        if t and sigma:
            raise ValueError("set one of gaussian_start_t and gaussian_start_sigma, not both")
        if (t or sigma) and start_sigma is not None:
            raise ValueError(
                "a Gaussian start and a chain started part-way (SDEdit) both choose where the "
                "chain starts; use one"
            )
        return self.start_sigma(formulation) if (t or sigma) else None

    # -- names -------------------------------------------------------------------------------
    @property
    def tag(self) -> str:
        """Short file-name tag, e.g. 'ddim50' or 'dpm_solverpp20'."""
        return f"{self.sampler.replace('+', 'p')}{self.num_steps}"

    def name(self, formulation: Formulation | None = None) -> str:
        """File-name stem of every choice that changes the samples, e.g. 'ddim50_eta0.5_g2':
        `tag`, the sampler's options that differ from their defaults (as labelled in its
        module), the grid's spacing where not 'linspace' (resolved for `formulation` when
        timestep_spacing is ''), sigma_max and rho where they apply and differ from 80 and 7,
        sigma_min where a continuous grid uses it and it is not 0.002, the Gaussian start
        ('gs800', 'gss2.5'), guidance_scale and (when guided) its interval ('g2_gi0.3-5'),
        temperature and clip_x0 where not the default."""
        parts = [self.tag, *option_labels(self.options)]
        spacing_name = self.timestep_spacing
        if not spacing_name and formulation is not None:
            spacing_name = self.spacing_for(formulation)
        if spacing_name and spacing_name != "linspace":
            parts.append(spacing_name)
        in_sigma = spacing_name in spacing.SIGMA_SPACINGS
        if in_sigma and self.sigma_max != spacing.SIGMA_MAX:
            parts.append(f"smax{self.sigma_max:g}")
        if spacing_name == "karras" and self.rho != spacing.RHO:
            parts.append(f"rho{self.rho:g}")
        continuous = formulation is not None and formulation.levels is None
        if in_sigma and continuous and self.sigma_min != spacing.SIGMA_MIN:
            parts.append(f"sigmin{self.sigma_min:g}")
        if self.gaussian_start_t:
            parts.append(f"gs{self.gaussian_start_t}")
        if self.gaussian_start_sigma:
            parts.append(f"gss{self.gaussian_start_sigma:g}")
        if self.guidance_scale != 1.0:
            parts.append(f"g{self.guidance_scale:g}")
            if tuple(self.guidance_interval) != guidance.EVERYWHERE:
                lo, hi = self.guidance_interval
                parts.append(f"gi{lo:g}-{hi:g}")
        if self.temperature != 1.0:
            parts.append(f"temp{self.temperature:g}")
        if not self.clip_x0:
            parts.append("noclip")
        return "_".join(parts)

    def sample(
        self,
        model_fn: Callable[..., Array],
        formulation: Formulation,
        shape: tuple[int, ...],
        rng: Array,
        **inputs: Any,
    ) -> Any:
        """`driver.run(self, model_fn, formulation, shape, rng, **inputs)`; inputs are the
        per-call arguments (labels, guide_fn, sample_ids, x_init, start_sigma,
        return_trajectory, data_gaussian)."""
        return driver.run(self, model_fn, formulation, shape, rng, **inputs)


def default_spacing(sampler: str, formulation: Formulation) -> str:
    """The grid a sampler uses on a formulation unless told otherwise: its own
    (`Sampler.default_spacing`, e.g. heun's 'karras'), else the formulation's
    (`Formulation.default_spacing`)."""
    return registry.get_sampler(sampler).default_spacing or formulation.default_spacing


def check_options(values: Any, formulation: Formulation) -> None:
    """ValueError naming the fix for a bad value of any registered sampler's option that
    `values` (a mapping, e.g. a config's `sampling` section) sets, whichever sampler it
    chooses: a bad option is a mistake even where the chosen sampler ignores it."""
    for entry in registry.registered():
        names = _field_names(entry.options) & set(values.keys())
        if names:
            _check(entry.options(**{name: values[name] for name in names}), formulation)


def _check(options: Any, formulation: Formulation) -> None:
    """An options dataclass's own checks: `check()` of its values, and
    `check_formulation(formulation)` of what the model must be for them."""
    check = getattr(options, "check", None)
    if check is not None:
        check()
    check_formulation = getattr(options, "check_formulation", None)
    if check_formulation is not None:
        check_formulation(formulation)


def choice_names() -> set[str]:
    """Every name `SamplerSpec.choose` takes: spec fields and every registered sampler's
    options."""
    names = _spec_fields() - {"options"}
    for entry in registry.registered():
        names |= _field_names(entry.options)
    return names


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _spec_fields() -> set[str]:
    return _field_names(SamplerSpec)
