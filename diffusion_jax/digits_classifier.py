"""A check of digit samples: which class does a classifier trained on real digits see?

A generative model of digits should produce every class, and each sample should look like one
digit. `DigitsClassifier` is the shipped digits feature network
(`diffusion_jax.evaluation.digits_net`, a small CNN trained on the digits train split only,
98% test accuracy), read through its softmax; `class_report` summarises its verdict on a set of
samples. It is a sanity check beside digits FD, not a quality metric itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_collections
import numpy as np

from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import digits_net


@dataclass(frozen=True)
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
        self._net = digits_net.DigitsFeatures(weights_path)
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


def _digits_config(data_dir: str | None) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "digits",
            "data_dir": data_dir or "",
            "train_split": "train",
            "eval_split": "test",
            "image_size": 8,
            "random_flip": False,
            "image_key": "image",
            "label_key": "label",
            "num_read_threads": 0,
        }
    )
