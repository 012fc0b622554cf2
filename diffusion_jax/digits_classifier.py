"""A check of digit samples: which class does a classifier trained on real digits see?

A generative model of digits should produce every class, and each sample should look like one
digit. `DigitsClassifier` is a scikit-learn SVM fitted on the digits train split (98-99% test
accuracy); `class_report` summarises its verdict on a set of samples. It is a sanity check,
not a quality metric like FID.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.svm import SVC

from diffusion_jax.data import pipeline


@dataclass(frozen=True)
class ClassReport:
    """counts: (10,) samples per predicted class; confidence: mean top-class probability."""

    counts: np.ndarray
    confidence: float

    @property
    def classes_present(self) -> int:
        return int(np.count_nonzero(self.counts))


class DigitsClassifier:
    """SVM on uint8 (N, 8, 8, 1) digit images; fitted on the train split of `data_dir`."""

    def __init__(self, data_dir: str | None = None) -> None:
        config = _digits_config(data_dir)
        images, labels = pipeline.eval_images(config, "train")
        self._svm = CalibratedClassifierCV(SVC(gamma="scale"), ensemble=False)
        self._svm.fit(_features(images), labels)
        self._data_config = config

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, 8, 8, 1) -> float (N, 10) class probabilities."""
        return self._svm.predict_proba(_features(images))

    def accuracy(self, split: str = "test") -> float:
        images, labels = pipeline.eval_images(self._data_config, split)
        return float(np.mean(self.predict_proba(images).argmax(-1) == labels))

    def class_report(self, images: np.ndarray) -> ClassReport:
        probs = self.predict_proba(images)
        counts = np.bincount(probs.argmax(-1), minlength=10)
        return ClassReport(counts=counts, confidence=float(probs.max(-1).mean()))


def _features(images: np.ndarray) -> np.ndarray:
    if images.shape[1:] != (8, 8, 1) or images.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 digit images of shape (N, 8, 8, 1), got {images.dtype} "
            f"{images.shape}; sample with data.image_size=8"
        )
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def _digits_config(data_dir: str | None):  # -> ml_collections.ConfigDict
    import ml_collections

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
