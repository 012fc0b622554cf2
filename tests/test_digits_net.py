"""The shipped digits network: weights, fingerprint, shapes, batching and refusals of the feature
network, and the class check (`DigitsClassifier`) recognising real digits, not noise."""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import pytest
from flax import serialization

from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import digits_net
from diffusion_jax.evaluation.digits_net import DigitsClassifier

SHIPPED = os.path.join(os.path.dirname(digits_net.__file__), digits_net.DEFAULT_WEIGHTS)


@pytest.fixture(scope="module")
def net() -> digits_net.DigitsFeatures:
    return digits_net.DigitsFeatures()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def test_shipped_weights_are_small_and_fingerprinted_by_their_sha256(net):
    with open(SHIPPED, "rb") as f:
        data = f.read()
    assert len(data) < 200_000
    assert net.fingerprint == hashlib.sha256(data).hexdigest()[:16]
    assert net.name == "digits" and len(net.fingerprint) == 16


def test_features_and_logits_have_the_documented_shapes_and_dtypes(net):
    features, logits = net(_images(7))
    assert features.shape == (7, net.feature_dim) and features.dtype == np.float32
    assert logits.shape == (7, 10) and logits.dtype == np.float32
    assert np.all(features >= 0)  # Post-ReLU features, like Inception's pool3.


def test_outputs_do_not_depend_on_the_internal_batch_size_or_padding(net):
    images = _images(23, seed=1)
    small = digits_net.DigitsFeatures(batch_size=5)  # 5 chunks, the last one padded.
    for a, b in zip(net(images), small(images), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    single_features, _ = net(images[3:4])
    np.testing.assert_allclose(single_features[0], net(images)[0][3], rtol=1e-5, atol=1e-5)


def test_no_images_give_empty_outputs(net):
    features, logits = net(np.zeros((0, 8, 8, 1), np.uint8))
    assert features.shape == (0, net.feature_dim) and logits.shape == (0, 10)


def test_uint8_images_are_scaled_to_the_samples_range():
    x = digits_net.to_model_input(np.array([0, 255, 128], np.uint8).reshape(1, 1, 3, 1))
    np.testing.assert_allclose(x.ravel(), [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((2, 8, 8, 1), np.float32),
        np.zeros((2, 16, 16, 1), np.uint8),
        np.zeros((8, 8), np.uint8),
    ],
)
def test_images_of_the_wrong_dtype_or_shape_are_refused_with_the_fix(net, images):
    with pytest.raises(ValueError, match=r"data\.image_size=8"):
        net(images)


def test_other_weights_load_from_a_path_with_their_own_fingerprint(net, tmp_path):
    variables = digits_net.init_params(seed=3)
    path = tmp_path / "other.msgpack"
    path.write_bytes(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, variables)))
    other = digits_net.DigitsFeatures(str(path))
    assert other.fingerprint != net.fingerprint
    images = _images(4, seed=2)
    assert not np.allclose(other(images)[1], net(images)[1])


def test_a_garbage_or_mismatched_weights_file_is_refused_with_the_fix(tmp_path):
    garbage = tmp_path / "garbage.msgpack"
    garbage.write_bytes(b"\xc1 not msgpack")
    with pytest.raises(ValueError, match=r"experiments\.train_digits_classifier"):
        digits_net.DigitsFeatures(str(garbage))
    narrow = digits_net.DigitsCNN(feature_dim=8).init(
        jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32)
    )
    wrong = tmp_path / "wrong.msgpack"
    wrong.write_bytes(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, narrow)))
    with pytest.raises(ValueError, match="does not hold DigitsCNN weights"):
        digits_net.DigitsFeatures(str(wrong))


# --- The class check -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(digits_data_dir):
    return DigitsClassifier(digits_data_dir)


def test_classifier_recognises_held_out_real_digits(classifier):
    assert classifier.accuracy("test") >= 0.97


def test_classifier_probabilities_are_a_distribution_per_image(classifier, tiny_config):
    images, _ = pipeline.eval_images(tiny_config.data, "test", max_examples=20)
    probs = classifier.predict_proba(images)
    assert probs.shape == (20, 10) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)


def test_class_report_on_real_test_digits_covers_every_class_confidently(classifier, tiny_config):
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


def test_class_report_refuses_the_wrong_image_shape_with_the_fix(classifier):
    with pytest.raises(ValueError, match="image_size=8"):
        classifier.class_report(np.zeros((4, 16, 16, 1), np.uint8))
