"""The model as every sampler calls it: output -> (x0, eps) predictions at one timestep.

A learn_sigma model (output (B, ..., 2C), Improved DDPM) is used through its first C channels
(the prediction); the last C, its variance values, are returned for the samplers that read them
(ddpm with variance='learned_range').

`EDMDenoiser` is the same for the EDM formulation: the network F preconditioned into
D(x; sigma) at a noise level sigma instead of a timestep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion
from diffusion_jax.edm import EDM
from diffusion_jax.schedules import Schedule

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """net(x_t (B, ...), t int32 (B,)) -> output of type `prediction` (labels and guidance
    already bound, `guidance.conditioned_model`), turned into clipped x0 and eps predictions.

    shape: (B, ...) of x_t; clip_x0 clips x0 to [-1, 1] and recomputes eps from it; dtype: the
    float dtype of the predictions (`diffusion.float_dtype()`).
    """

    net: Callable[[Array, Array], Array]
    sch: Schedule
    shape: tuple[int, ...]
    prediction: str
    clip_x0: bool
    learn_sigma: bool
    dtype: Any

    def with_variance(self, x: Array, t_step: Array) -> tuple[Array, Array, Array | None]:
        """(x0, eps) predictions (B, ...) at the integer timestep t_step (scalar), and the
        variance values (B, ...) of a learn_sigma model (else None)."""
        shape, dtype, learn_sigma = self.shape, self.dtype, self.learn_sigma
        out_shape = (*shape[:-1], 2 * shape[-1]) if learn_sigma else shape
        t = jnp.full((shape[0],), t_step, dtype=jnp.int32)
        out = self.net(x, t)
        if out.shape != out_shape:
            hint = " (a learned-variance model needs learn_sigma=True)" if not learn_sigma else ""
            raise ValueError(f"model_fn returned shape {out.shape}; expected {out_shape}{hint}")
        out = out.astype(dtype)
        var_values = None
        if learn_sigma:
            out, var_values = diffusion.split_learned_variance(out)
        x0, eps = diffusion.model_output_to_x0_eps(self.sch, x, t, out, self.prediction)
        if self.clip_x0:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = diffusion.predict_eps_from_x0(self.sch, x, t, x0)
        return x0.astype(dtype), eps.astype(dtype), var_values

    def __call__(self, x: Array, t_step: Array) -> tuple[Array, Array]:
        """(x0, eps) predictions (B, ...) at the integer timestep t_step (scalar)."""
        x0, eps, _ = self.with_variance(x, t_step)
        return x0, eps


@dataclasses.dataclass(frozen=True)
class EDMDenoiser:
    """net(x_in (B, ...), time (B,)) -> F (labels and guidance bound in), preconditioned by
    `process` into D(x; sigma) (`edm.EDM.denoise`): the x0 prediction, clipped to [-1, 1] with
    clip_x0, and eps = (x - x0) / sigma.

    Classifier-free guidance combines F's conditional and unconditional outputs; D is affine in
    F with weights fixed by x and sigma, so that is the same guided combination of D.
    """

    net: Callable[[Array, Array], Array]
    process: EDM
    shape: tuple[int, ...]
    clip_x0: bool
    dtype: Any

    def __call__(self, x: Array, sigma: Array) -> tuple[Array, Array]:
        """(x0, eps) predictions (B, ...) at the noise level sigma (scalar, > 0)."""
        x = x.astype(self.dtype)
        x0 = self.process.denoise(self.net, x, sigma)
        if x0.shape != self.shape:
            raise ValueError(f"model_fn returned shape {x0.shape}; expected {self.shape}")
        if self.clip_x0:
            x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - x0) / jnp.asarray(sigma, self.dtype)
        return x0.astype(self.dtype), eps.astype(self.dtype)
