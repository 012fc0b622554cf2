"""A run's formulation from its config: `diffusion.formulation` picks the module, its section's
keys give the constants (`from_config`), and `check` refuses keys the formulation cannot honour.
The only place the runner names formulations; everything after asks the formulation object.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

from diffusion_jax import formulations, schedules
from diffusion_jax.errors import ConfigError
from diffusion_jax.formulations import flow

# The diffusion keys only the ddpm formulation reads, with the value the others need them at.
DDPM_ONLY_KEYS = (
    ("diffusion.prediction", "eps"),
    ("diffusion.loss_weighting", "simple"),
    ("diffusion.zero_terminal_snr", False),
    ("model.learn_sigma", False),
)


def name_of(config: Any) -> str:
    """`diffusion.formulation` ('ddpm' for configs saved before the key existed)."""
    return str(config.diffusion.get("formulation", "ddpm"))


def from_config(config: Any) -> formulations.Formulation:
    """The `Formulation` of a run config (any mapping with `diffusion` and `model` sections)."""
    d, name = config.diffusion, name_of(config)
    if name == "edm":
        return formulations.EDM(sigma_data=d.sigma_data, p_mean=d.p_mean, p_std=d.p_std)
    if name == "flow":
        return formulations.Flow(
            time_sampling=d.flow_time_sampling,
            logit_mean=d.flow_logit_mean,
            logit_std=d.flow_logit_std,
            shift=d.flow_shift,
        )
    return formulations.DDPM(
        schedules.from_config(d),
        prediction=d.prediction,
        learn_sigma=bool(config.model.get("learn_sigma", False)),
        weighting=d.loss_weighting,
        min_snr_gamma=d.min_snr_gamma,
        vlb_weight=d.get("vlb_weight", 0.001),
    )


def denoiser_difference(config: Any, other: Any) -> str:
    """'' when the networks of two run configs mean the same by their output (the same
    formulation; ddpm: the same schedule, prediction and learned variance; edm: the same
    sigma_data), else what differs in `other`."""
    ours, theirs = from_config(config), from_config(other)
    if ours.name != theirs.name:
        return f"diffusion.formulation={theirs.name!r}, not {ours.name!r}"
    if isinstance(ours, formulations.DDPM) and isinstance(theirs, formulations.DDPM):
        for key, a, b in (
            ("diffusion.prediction", ours.prediction, theirs.prediction),
            ("model.learn_sigma", ours.learn_sigma, theirs.learn_sigma),
        ):
            if a != b:
                return f"{key}={b!r}, not {a!r}"
        if not np.array_equal(ours.levels, theirs.levels):
            return "another noise schedule (diffusion.schedule, num_timesteps, ...)"
    if isinstance(ours, formulations.EDM) and isinstance(theirs, formulations.EDM):
        if ours.sigma_data != theirs.sigma_data:
            return f"diffusion.sigma_data={theirs.sigma_data!r}, not {ours.sigma_data!r}"
    return ""


def check(config: ml_collections.ConfigDict) -> None:
    """ConfigError for an unknown formulation, keys it cannot honour, or bad constants."""
    name = name_of(config)
    if name not in formulations.FORMULATIONS:
        raise ConfigError(f"diffusion.formulation={name!r}; use one of {formulations.FORMULATIONS}")
    if name != "ddpm":
        for key, needed in DDPM_ONLY_KEYS:
            section, leaf = key.split(".")
            value = config[section].get(leaf, needed)
            if value != needed:
                raise ConfigError(
                    f"{key}={value!r} has no meaning for diffusion.formulation={name!r} (it "
                    f"fixes its network's target and loss weight); leave it at {needed!r}"
                )
    d = config.diffusion
    if name == "edm":
        for key in ("sigma_data", "p_std"):
            value = d.get(key)
            if not (_finite(value) and value > 0):
                raise ConfigError(
                    f"diffusion.{key}={value!r}; use a finite value > 0 (EDM: "
                    f"{'0.5' if key == 'sigma_data' else '1.2'})"
                )
        if not _finite(d.get("p_mean")):
            raise ConfigError(
                f"diffusion.p_mean={d.get('p_mean')!r}; use a finite value (EDM: -1.2)"
            )
    if name == "flow":
        sampling = d.get("flow_time_sampling")
        if sampling not in flow.TIME_SAMPLINGS:
            raise ConfigError(
                f"diffusion.flow_time_sampling={sampling!r}; use one of {flow.TIME_SAMPLINGS}"
            )
        if not _finite(d.get("flow_logit_mean")):
            raise ConfigError(
                f"diffusion.flow_logit_mean={d.get('flow_logit_mean')!r}; use a finite value "
                "(SD3: 0)"
            )
        for key, hint in (("flow_logit_std", "SD3: 1"), ("flow_shift", "1 = none; SD3: 3")):
            value = d.get(key)
            if not (_finite(value) and value > 0):
                raise ConfigError(f"diffusion.{key}={value!r}; use a finite value > 0 ({hint})")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
