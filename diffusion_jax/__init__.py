"""diffusion_jax: denoising diffusion models (DDPM and descendants) in JAX/Flax."""

__version__ = "0.1.0"
