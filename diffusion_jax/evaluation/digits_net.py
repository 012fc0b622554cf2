"""The feature network of "digits FD": a small CNN classifier of the 8x8 digits.

`DigitsCNN` maps images in [-1, 1] (the value range of our diffusion samples) to a
`FEATURE_DIM`-dimensional penultimate feature and 10 class logits. Its weights ship with the
package (`assets/digits_net.msgpack`, written by `python -m experiments.train_digits_classifier`
from the digits TRAIN split only), so digits FD, IS and precision/recall mean the same thing on
every machine. `DigitsFeatures` implements `features.FeatureNetwork` on uint8 images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import types
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax.data import pipeline

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
FEATURE_DIM = 64
DEFAULT_WEIGHTS = "assets/digits_net.msgpack"  # Relative to the diffusion_jax.evaluation package.


class DigitsCNN(nn.Module):
    """(B, 8, 8, 1) float32 in [-1, 1] -> (features (B, FEATURE_DIM), logits (B, 10)).

    Three 3x3 convolutions with two 2x2 average pools (8x8 -> 4x4 -> 2x2), then a dense
    feature layer (after ReLU, like Inception's pool3 features) and a linear classifier.
    About 44k parameters: the weights file is ~180 KB.
    """

    feature_dim: int = FEATURE_DIM
    num_classes: int = NUM_CLASSES
    widths: tuple[int, int, int] = (24, 48, 48)

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = nn.relu(nn.Conv(self.widths[0], (3, 3))(x))
        x = nn.relu(nn.Conv(self.widths[1], (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(self.widths[2], (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        features = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
        logits = nn.Dense(self.num_classes)(features)
        return features, logits


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (B, 8, 8, 1) -> float32 (B, 8, 8, 1) in [-1, 1], exactly as the data pipeline."""
    return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def check_images(images: np.ndarray) -> None:
    """Raises ValueError unless `images` is uint8 (B, 8, 8, 1)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(
            f"expected uint8 digit images of shape (N, 8, 8, 1), got {images.dtype} "
            f"{images.shape}; sample with data.image_size=8 (floats in [-1, 1]: "
            "diffusion_jax.images.to_uint8)"
        )


def fingerprint_of(data: bytes) -> str:
    """The first 16 hex digits of the sha256 of a weights file's bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


def init_params(seed: int = 0) -> Any:
    """Freshly initialised DigitsCNN variables ({'params': ...})."""
    return DigitsCNN().init(jax.random.PRNGKey(seed), jnp.zeros((1, *IMAGE_SHAPE), jnp.float32))


def _read_weights(weights_path: str | None) -> bytes:
    if weights_path is None:
        resource = importlib.resources.files("diffusion_jax.evaluation").joinpath(DEFAULT_WEIGHTS)
        try:
            return resource.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"the shipped digits network weights {DEFAULT_WEIGHTS} are missing from the "
                "installed package; reinstall it, or recreate them with: "
                "python -m experiments.train_digits_classifier"
            ) from None
    with open(weights_path, "rb") as f:
        return f.read()


def _restore(data: bytes, source: str) -> Any:
    """msgpack bytes -> DigitsCNN variables, checked against the architecture's shapes."""
    expected = jax.eval_shape(init_params)
    try:
        restored = flax.serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types on garbage.
        raise ValueError(
            f"{source} is not a flax msgpack weights file ({type(e).__name__}); recreate it "
            "with: python -m experiments.train_digits_classifier"
        ) from None
    want = {k: v.shape for k, v in traverse_util.flatten_dict(expected).items()}
    try:
        got = {k: np.shape(v) for k, v in traverse_util.flatten_dict(restored).items()}
    except Exception:  # Not a nested dict of arrays at all.
        got = None
    if got != want:
        raise ValueError(
            f"{source} does not hold DigitsCNN weights (feature_dim={FEATURE_DIM}); recreate it "
            "with: python -m experiments.train_digits_classifier"
        )
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), restored)


class DigitsFeatures:
    """The shipped digits classifier as a `FeatureNetwork`.

    Attributes:
      name: 'digits'.
      fingerprint: first 16 hex digits of the sha256 of the weights file.
      feature_dim: FEATURE_DIM.
      num_classes: 10.
    """

    name = "digits"

    def __init__(self, weights_path: str | None = None, *, batch_size: int = 500) -> None:
        """Loads the shipped weights, or those at `weights_path`.

        Args:
          weights_path: a flax msgpack file of DigitsCNN variables; None = the shipped one.
          batch_size: images per jitted call; inputs are cut into / padded to this size so
            the network compiles once whatever the number of images.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        data = _read_weights(weights_path)
        self.fingerprint = fingerprint_of(data)
        self.feature_dim = FEATURE_DIM
        self.num_classes = NUM_CLASSES
        self.batch_size = batch_size
        self._variables = _restore(data, weights_path or DEFAULT_WEIGHTS)
        self._apply = jax.jit(DigitsCNN().apply)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, 8, 8, 1) -> (features float32 (B, FEATURE_DIM), logits float32 (B, 10))."""
        images = np.asarray(images)
        check_images(images)
        n, b = len(images), self.batch_size
        features = np.empty((n, self.feature_dim), np.float32)
        logits = np.empty((n, self.num_classes), np.float32)
        for start in range(0, n, b):
            chunk = to_model_input(images[start : start + b])
            m = len(chunk)
            if m < b:  # Pad the last chunk: one compiled shape for every call.
                chunk = np.concatenate([chunk, np.zeros((b - m, *IMAGE_SHAPE), np.float32)])
            f, lg = self._apply(self._variables, chunk)
            features[start : start + m] = np.asarray(f)[:m]
            logits[start : start + m] = np.asarray(lg)[:m]
        return features, logits


# ---------------------------------------------------------------------------------------------
# The same network as a classifier: which class does it see in digit samples? A generative
# model of digits should produce every class, and each sample should look like one digit. A
# sanity check beside digits FD, not a quality metric itself.


@dataclasses.dataclass(frozen=True)
class ClassReport:
    """counts: (10,) samples per predicted class; confidence: mean top-class probability."""

    counts: np.ndarray
    confidence: float

    @property
    def classes_present(self) -> int:
        return int(np.count_nonzero(self.counts))


class DigitsClassifier:
    """The shipped digits CNN as a classifier of uint8 (N, 8, 8, 1) digit images.

    Args:
      data_dir: TFDS data dir holding the digits (read only by `accuracy`).
      weights_path: DigitsCNN weights; None = the ones shipped with the package.
    """

    def __init__(self, data_dir: str | None = None, *, weights_path: str | None = None) -> None:
        self._net = DigitsFeatures(weights_path)
        self._data_config = _digits_config(data_dir)

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the weights in use (see DigitsFeatures)."""
        return self._net.fingerprint

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 8, 8, 1) -> float64 (N, 10) class probabilities."""
        _, logits = self._net(images)
        z = logits.astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def accuracy(self, split: str = "test") -> float:
        """Fraction of a real digits split classified correctly."""
        images, labels = pipeline.eval_images(self._data_config, split)
        return float(np.mean(self.predict_proba(images).argmax(-1) == labels))

    def class_report(self, images: np.ndarray) -> ClassReport:
        """Predicted-class counts and mean confidence over uint8 (N, 8, 8, 1) images."""
        probs = self.predict_proba(images)
        counts = np.bincount(probs.argmax(-1), minlength=10)
        return ClassReport(counts=counts, confidence=float(probs.max(-1).mean()))


def _digits_config(data_dir: str | None) -> types.SimpleNamespace:
    """The data description `pipeline.eval_images` reads the digits splits with."""
    return types.SimpleNamespace(name="digits", data_dir=data_dir or "", eval_split="test")
