r"""Report which digit classes a samples file contains, per a classifier trained on real digits.

python -m experiments.classify_digits --samples=workdirs/digits/samples/dpm_solverpp20_seed0.npz

The classifier is the shipped digits feature network (the one behind digits FD); --data_dir is
only read to report its accuracy on the real test split.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

from diffusion_jax.evaluation.digits_net import DigitsClassifier

_SAMPLES = flags.DEFINE_string("samples", None, "A samples .npz written by --mode=sample.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir of the digits dataset.")
flags.mark_flag_as_required("samples")


def main(argv: list[str]) -> None:
    del argv
    path = str(_SAMPLES.value)  # Required flag: never None here.
    if not os.path.exists(path):
        sys.exit(f"error: {path} does not exist; write it with --mode=sample first")
    classifier = DigitsClassifier(_DATA_DIR.value or None)
    with np.load(path) as samples:
        images = samples["images"]
        labels = samples["labels"] if "labels" in samples else None
    report = classifier.class_report(images)
    print(f"classifier accuracy on real test digits: {classifier.accuracy():.3f}")
    print(f"samples per class 0-9: {report.counts.tolist()}")
    print(f"classes present: {report.classes_present}/10, mean confidence {report.confidence:.3f}")
    if labels is not None:  # a class-conditional model's samples: were the classes obeyed?
        predicted = classifier.predict_proba(images).argmax(-1)
        print(f"samples classified as their requested label: {np.mean(predicted == labels):.3f}")


if __name__ == "__main__":
    app.run(main)
