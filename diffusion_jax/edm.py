"""Deprecated location of the EDM formulation: use `diffusion_jax.formulations.edm` (and the
Karras grid of `diffusion_jax.samplers.spacing`). Kept for one release (docs/library.md)."""

from __future__ import annotations

from diffusion_jax.formulations.edm import (  # noqa: F401
    EDM,
    NOISE_INPUT_SCALE,
    from_config,
)
from diffusion_jax.samplers.spacing import (  # noqa: F401
    RHO,
    SIGMA_MAX,
    SIGMA_MIN,
    check_sigma_range,
    karras_sigmas,
    log_sigmas,
)
