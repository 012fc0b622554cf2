"""TFDS builder for scikit-learn's 8x8 handwritten digits (1797 images, 10 classes).

A tiny, offline dataset for smoke tests and laptop-sized diffusion experiments. It is built
from `sklearn.datasets.load_digits` (bundled with scikit-learn, so no network) into
ArrayRecord files, which Grain reads by random access without TensorFlow:

    from diffusion_jax.data import digits
    builder = digits.Digits(data_dir='/tmp/tfds')
    builder.download_and_prepare(
        file_format='array_record',  # What Grain reads without TensorFlow.
        download_config=digits.offline_download_config(),
    )
    source = builder.as_data_source(split='train')  # source[i]['image']: (8, 8, 1) uint8

`diffusion_jax.data.pipeline.ensure_prepared('digits', data_dir)` does this on first use.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
NUM_EXAMPLES = 1797
TEST_FRACTION = 0.2
# Fixed so that every machine builds the same train/test split.
SPLIT_SEED = 0

_DESCRIPTION = """\
The scikit-learn copy of the UCI ML hand-written digits test set: 1797 grayscale 8x8 images
of the digits 0-9 (about 180 per class). Pixel counts 0..16 are rescaled to uint8 0..255 by
round(v * 255 / 16). The splits are a deterministic stratified 80/20 split (seed 0): about
20% of each class goes to 'test', the rest to 'train'.
"""

_CITATION = """\
@misc{uci_optdigits,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49}
}
"""


def load_images_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """Returns all sklearn digits in sklearn's order.

    Returns:
      images: (1797, 8, 8, 1) uint8 in 0..255 (sklearn's 0..16 scaled by 255 / 16, rounded).
      labels: (1797,) int64 in 0..9.
    """
    # Imported here so that importing the data package does not pay for sklearn.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, np.float64) * (255.0 / 16.0))
    images = np.clip(images, 0, 255).astype(np.uint8)[..., None]
    labels = np.asarray(bunch.target, np.int64)
    return images, labels


def split_indices(
    labels: np.ndarray, *, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION
) -> dict[str, np.ndarray]:
    """Deterministic stratified split of example indices.

    Args:
      labels: (N,) int class labels.
      seed: seed of the per-class permutations.
      test_fraction: fraction of each class (rounded) that goes to 'test'.

    Returns:
      {'train': (N_train,) int64, 'test': (N_test,) int64}: sorted, disjoint indices into
      `labels` that together cover every example once.
    """
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[: round(len(members) * test_fraction)])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels), dtype=np.int64), test_idx)
    return {"train": train_idx, "test": test_idx}


def offline_download_config() -> tfds.download.DownloadConfig:
    """A DownloadConfig that never looks for a pre-built copy on GCS (no network)."""
    return tfds.download.DownloadConfig(try_download_gcs=False)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits as a TFDS dataset ('digits')."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {  # noqa: RUF012 (tfds reads this class attribute)
        "1.0.0": "Initial release: sklearn load_digits, uint8 0..255, stratified 80/20 split.",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, Any]]]:
        del dl_manager  # The data ships with scikit-learn.
        images, labels = load_images_and_labels()
        return {
            split: self._generate_examples(images, labels, idx)
            for split, idx in split_indices(labels).items()
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        # The key is the index in sklearn's order: unique across both splits.
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}
