"""The digits class check (the shipped digits network) recognises real digits, not noise."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_jax.data import pipeline
from diffusion_jax.evaluation.digits_net import DigitsClassifier, DigitsFeatures


@pytest.fixture(scope="module")
def classifier(digits_data_dir):
    return DigitsClassifier(digits_data_dir)


def test_classifier_recognises_held_out_real_digits(classifier):
    assert classifier.accuracy("test") >= 0.97


def test_classifier_is_the_shipped_digits_feature_network(classifier):
    assert classifier.fingerprint == DigitsFeatures().fingerprint


def test_probabilities_are_a_distribution_per_image(classifier, tiny_config):
    images, _ = pipeline.eval_images(tiny_config.data, "test", max_examples=20)
    probs = classifier.predict_proba(images)
    assert probs.shape == (20, 10) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)


def test_report_on_real_test_digits_covers_every_class_confidently(classifier, tiny_config):
    images, labels = pipeline.eval_images(tiny_config.data, "test")
    report = classifier.class_report(images)
    assert report.classes_present == 10
    np.testing.assert_allclose(report.counts, np.bincount(labels, minlength=10), atol=3)
    assert report.confidence > 0.9


def test_a_collapsed_generator_is_reported_as_missing_classes(classifier, tiny_config):
    images, labels = pipeline.eval_images(tiny_config.data, "test")
    only_sevens = images[labels == 7]
    report = classifier.class_report(only_sevens)
    assert report.classes_present <= 2 and report.counts[7] >= 0.95 * len(only_sevens)


@pytest.mark.parametrize("kind", ["uniform", "black", "white"])
def test_noise_and_blank_images_do_not_look_like_confident_digits(classifier, kind):
    rng = np.random.default_rng(42)
    images = {
        "uniform": rng.integers(0, 256, (200, 8, 8, 1), dtype=np.uint8),
        "black": np.zeros((200, 8, 8, 1), np.uint8),
        "white": np.full((200, 8, 8, 1), 255, np.uint8),
    }[kind]
    probs = classifier.predict_proba(images)
    assert probs.max(axis=1).mean() < 0.5
    assert np.mean(probs.max(axis=1) > 0.9) < 0.05


def test_wrong_image_shape_is_refused_with_the_fix(classifier):
    with pytest.raises(ValueError, match="image_size=8"):
        classifier.class_report(np.zeros((4, 16, 16, 1), np.uint8))
