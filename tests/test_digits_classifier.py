"""The digits class check recognises real digits and is not fooled by noise."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_jax.data import pipeline
from diffusion_jax.digits_classifier import DigitsClassifier


@pytest.fixture(scope="module")
def classifier(digits_data_dir):
    return DigitsClassifier(digits_data_dir)


def test_classifier_recognises_held_out_real_digits(classifier):
    assert classifier.accuracy("test") > 0.97


def test_report_on_real_test_digits_covers_every_class_confidently(classifier, tiny_config):
    images, labels = pipeline.eval_images(tiny_config.data, "test")
    report = classifier.class_report(images)
    assert report.classes_present == 10
    np.testing.assert_allclose(report.counts, np.bincount(labels, minlength=10), atol=3)
    assert report.confidence > 0.8


def test_a_collapsed_generator_is_reported_as_missing_classes(classifier, tiny_config):
    images, labels = pipeline.eval_images(tiny_config.data, "test")
    only_sevens = images[labels == 7]
    report = classifier.class_report(only_sevens)
    assert report.classes_present <= 2 and report.counts[7] >= 0.95 * len(only_sevens)


def test_wrong_image_shape_is_refused_with_the_fix(classifier):
    with pytest.raises(ValueError, match="image_size=8"):
        classifier.class_report(np.zeros((4, 16, 16, 1), np.uint8))
