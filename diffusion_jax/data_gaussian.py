"""The Gaussian model of the data, N(mean, cov) in pixel space, and its exact diffusion.

If the data were x0 ~ N(m, C) with C = U diag(lam) U^T, then x_t = a x0 + s eps (a = sqrt(ab_t),
s = sqrt(1 - ab_t)) would be N(a m, U diag(a^2 lam + s^2) U^T), and
    E[x0 | x_t] = m + U diag(a lam / (a^2 lam + s^2)) U^T (x_t - a m)        (`denoise`)
is the optimal denoiser. Its probability-flow ODE is linear and keeps every eigen-coordinate's
standardised value (x_t - a m)_i / sqrt(a^2 lam_i + s^2) fixed, so it moves x from any ab to any
other in closed form (`flow`).

At high noise a trained network's x0 prediction is worse than this denoiser's (the score of a
real dataset is nearly the Gaussian's there: Wang & Vastola 2023, "The hidden linear structure in
score-based models"), and a deterministic sampler carries that error to the end. The samplers'
Gaussian start (`samplers.sample(gaussian_start_t=...)`) therefore moves x_T to x at t_s with
`flow` and runs the network from t_s only: exact for Gaussian data, and it saves the model
evaluations above t_s.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@flax.struct.dataclass
class DataGaussian:
    """N(mean, eigvecs diag(eigvals) eigvecs^T) over flattened images (D = H W C values in
    [-1, 1]); a pytree, so pass it to jitted functions as an argument (a 3072-dim covariance is
    36 MiB: not a constant to embed in a compiled program).

    mean: (D,); eigvals: (D,) >= 0; eigvecs: (D, D), orthonormal columns.
    """

    mean: Any
    eigvals: Any
    eigvecs: Any

    @classmethod
    def fit(cls, images: np.ndarray) -> DataGaussian:
        """The mean and covariance (maximum likelihood, 1/N) of images (N, ...) as float64
        numpy, eigendecomposed. Raises ValueError for fewer than 2 images or non-finite values."""
        x = np.asarray(images, np.float64).reshape(len(images), -1)
        if x.shape[0] < 2 or not np.all(np.isfinite(x)):
            raise ValueError(f"need >= 2 finite images to fit a Gaussian; got shape {x.shape}")
        mean = x.mean(axis=0)
        centred = x - mean
        eigvals, eigvecs = np.linalg.eigh(centred.T @ centred / x.shape[0])
        return cls(mean=mean, eigvals=np.maximum(eigvals, 0.0), eigvecs=eigvecs)

    @property
    def dim(self) -> int:
        return int(np.shape(self.mean)[0])

    def as_arrays(self, dtype: Any = jnp.float32) -> DataGaussian:
        """The same Gaussian with jax arrays of `dtype` (to pass to a jitted function)."""
        return jax.tree.map(lambda a: jnp.asarray(a, dtype), self)

    def _coords(self, x: Array, a: Any) -> Array:
        """(B, ...) -> (B, D) eigen-coordinates of x - a mean."""
        flat = x.reshape(x.shape[0], -1)
        return (flat - a * self.mean) @ self.eigvecs

    def _from_coords(self, z: Array, a: Any, shape: tuple[int, ...]) -> Array:
        return (z @ self.eigvecs.T + a * self.mean).reshape(shape)

    def denoise(self, x_t: Array, ab: Any) -> Array:
        """E[x0 | x_t] (B, ...) under this Gaussian, with ab = alpha_bar_t (a scalar)."""
        a, var_noise = jnp.sqrt(ab), 1.0 - ab
        gain = a * self.eigvals / (ab * self.eigvals + var_noise)
        z = self._coords(x_t, a) * gain
        return (z @ self.eigvecs.T + self.mean).reshape(x_t.shape).astype(x_t.dtype)

    def flow(self, x: Array, ab_from: Any, ab_to: Any) -> Array:
        """The exact probability-flow ODE solution (B, ...) from x at alpha_bar = ab_from to
        alpha_bar = ab_to (scalars; either direction)."""
        a_from, a_to = jnp.sqrt(ab_from), jnp.sqrt(ab_to)
        std_from = jnp.sqrt(ab_from * self.eigvals + (1.0 - ab_from))
        std_to = jnp.sqrt(ab_to * self.eigvals + (1.0 - ab_to))
        z = self._coords(x, a_from) * (std_to / std_from)
        return self._from_coords(z, a_to, x.shape).astype(x.dtype)
