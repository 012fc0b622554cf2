"""`SamplerSpec`: every sampler option in one value, and the file-name stem that names it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from diffusion_jax import edm
from diffusion_jax.samplers import registry
from diffusion_jax.samplers.checks import validate_on_schedule, validate_sampler_args
from diffusion_jax.samplers.driver import sample
from diffusion_jax.samplers.spacing import SIGMA_SPACINGS
from diffusion_jax.schedules import Schedule

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Every sampler option in one value: built once (from a config, or by hand) and passed to
    `sample`, the sample / eval / edit modes, analysis and benchmarks alike.

    prediction and learn_sigma describe the model (the config's `diffusion.prediction` and
    `model.learn_sigma`); num_classes is the class count of a class-conditional model (else
    None). The rest are `config.sampling` keys; see `sample` for their meaning.
    """

    sampler: str = "ddim"
    num_steps: int = 50
    eta: float = 0.0
    prediction: str = "eps"
    clip_x0: bool = True
    temperature: float = 1.0
    timestep_spacing: str = "linspace"
    variance: str = "fixed_small"
    guidance_scale: float = 1.0
    num_classes: int | None = None
    learn_sigma: bool = False
    lower_order_final: bool = True
    sigma_max: float = edm.SIGMA_MAX
    rho: float = edm.RHO
    gaussian_start_t: int = 0
    sigma_min: float = edm.SIGMA_MIN
    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = float("inf")
    s_noise: float = 1.0

    @classmethod
    def from_config(cls, config: Any, num_classes: int | None = None) -> SamplerSpec:
        """From a run config's `sampling`, `diffusion.prediction` and `model.learn_sigma`
        (any mapping with those sections, e.g. an ml_collections ConfigDict)."""
        s = config.sampling
        return cls(
            sampler=s.sampler,
            num_steps=s.num_steps,
            eta=s.eta,
            prediction=config.diffusion.prediction,
            clip_x0=s.clip_x0,
            temperature=s.temperature,
            timestep_spacing=s.timestep_spacing,
            variance=s.variance,
            guidance_scale=s.guidance_scale,
            num_classes=num_classes,
            # A learned-variance model outputs 2C channels; the samplers must know to split them.
            learn_sigma=bool(config.model.get("learn_sigma", False)),
            lower_order_final=bool(s.get("lower_order_final", True)),
            # .get: configs saved before these keys existed.
            sigma_max=s.get("sigma_max", edm.SIGMA_MAX),
            rho=s.get("rho", edm.RHO),
            gaussian_start_t=s.get("gaussian_start_t", 0),
            sigma_min=s.get("sigma_min", edm.SIGMA_MIN),
            s_churn=s.get("s_churn", 0.0),
            s_min=s.get("s_min", 0.0),
            s_max=s.get("s_max", float("inf")),
            s_noise=s.get("s_noise", 1.0),
        )

    def replace(self, **changes: Any) -> SamplerSpec:
        """A copy with `changes` (unknown names raise TypeError)."""
        return dataclasses.replace(self, **changes)

    def validate(self, sch: Schedule | edm.EDM) -> None:
        """Raise ValueError naming the fix for any bad option, including options that fail on
        the schedule's values (a DDIM eta too large for its timesteps), and a sampler of the
        other formulation than `sch`'s (an `edm.EDM` is the edm formulation)."""
        is_edm = isinstance(sch, edm.EDM)
        validate_sampler_args(
            sampler=self.sampler,
            num_steps=self.num_steps,
            num_timesteps=sch.num_timesteps if isinstance(sch, Schedule) else 0,
            eta=self.eta,
            prediction=self.prediction,
            timestep_spacing=self.timestep_spacing,
            variance=self.variance,
            temperature=self.temperature,
            learn_sigma=self.learn_sigma,
            lower_order_final=self.lower_order_final,
            sigma_max=self.sigma_max,
            rho=self.rho,
            gaussian_start_t=self.gaussian_start_t,
            sigma_min=self.sigma_min,
            s_churn=self.s_churn,
            s_min=self.s_min,
            s_max=self.s_max,
            s_noise=self.s_noise,
            formulation="edm" if is_edm else "ddpm",
        )
        validate_on_schedule(
            sch,
            sampler=self.sampler,
            num_steps=self.num_steps,
            eta=self.eta,
            timestep_spacing=self.timestep_spacing,
            variance=self.variance,
            lower_order_final=self.lower_order_final,
            sigma_max=self.sigma_max,
            rho=self.rho,
            gaussian_start_t=self.gaussian_start_t,
        )

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of `sample`."""
        return dataclasses.asdict(self)

    @property
    def tag(self) -> str:
        """Short file-name tag, e.g. 'ddim50' or 'dpm_solverpp20'."""
        return f"{self.sampler.replace('+', 'p')}{self.num_steps}"

    def name(self) -> str:
        """File-name stem of every option that changes the samples, e.g. 'ddim50_eta0.5_g2':
        `tag`, the sampler's own options that differ from their defaults (as its registration
        labels them), then timestep_spacing (with sigma_max and rho where they apply and differ
        from 80 and 7; for the edm samplers sigma_min where not 0.002), the Gaussian start
        ('gs800'), guidance_scale, temperature and clip_x0 where not the default. prediction,
        learn_sigma and num_classes describe the model, not the sampler, and are left out."""
        parts = [self.tag]
        for option in registry.get_sampler(self.sampler).options:
            value = getattr(self, option.name)
            if value != option.default:
                parts.append(option.label(value))
        if self.timestep_spacing != "linspace":
            parts.append(self.timestep_spacing)
        if self.timestep_spacing in SIGMA_SPACINGS and self.sigma_max != edm.SIGMA_MAX:
            parts.append(f"smax{self.sigma_max:g}")
        if self.timestep_spacing == "karras" and self.rho != edm.RHO:
            parts.append(f"rho{self.rho:g}")
        is_edm = registry.get_sampler(self.sampler).formulation == "edm"
        if is_edm and self.sigma_min != edm.SIGMA_MIN:
            parts.append(f"sigmin{self.sigma_min:g}")
        if self.gaussian_start_t:
            parts.append(f"gs{self.gaussian_start_t}")
        if self.guidance_scale != 1.0:
            parts.append(f"g{self.guidance_scale:g}")
        if self.temperature != 1.0:
            parts.append(f"temp{self.temperature:g}")
        if not self.clip_x0:
            parts.append("noclip")
        return "_".join(parts)

    def sample(
        self,
        model_fn: Callable[..., Array],
        sch: Schedule | edm.EDM,
        shape: tuple[int, ...],
        rng: Array,
        **inputs: Any,
    ) -> Any:
        """`sample(model_fn, sch, shape, rng, **self.kwargs(), **inputs)`; inputs are the
        per-call arguments (labels, sample_ids, x_init, start_timestep, return_trajectory,
        data_gaussian)."""
        return sample(model_fn, sch, shape, rng, **self.kwargs(), **inputs)
