r"""Report which digit classes a samples file contains, per a classifier trained on real digits.

python -m experiments.classify_digits --samples=workdirs/digits/samples/dpm_solverpp20_seed0.npz
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from diffusion_jax.digits_classifier import DigitsClassifier

_SAMPLES = flags.DEFINE_string("samples", None, "A samples .npz written by --mode=sample.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir of the digits dataset.")
flags.mark_flag_as_required("samples")


def main(argv: list[str]) -> None:
    del argv
    classifier = DigitsClassifier(_DATA_DIR.value or None)
    report = classifier.class_report(np.load(_SAMPLES.value)["images"])
    print(f"classifier accuracy on real test digits: {classifier.accuracy():.3f}")
    print(f"samples per class 0-9: {report.counts.tolist()}")
    print(f"classes present: {report.classes_present}/10, mean confidence {report.confidence:.3f}")


if __name__ == "__main__":
    app.run(main)
