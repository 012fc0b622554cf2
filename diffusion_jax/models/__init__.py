"""Denoiser networks."""

from diffusion_jax.models.unet import UNet, count_params, validate_unet_config

__all__ = ["UNet", "count_params", "validate_unet_config"]
