"""Reference statistics: every image of a split, the FD floor, provenance and refusals."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import metrics, reference
from diffusion_jax.evaluation.digits_net import DigitsFeatures

FIX = re.escape(
    "python -m experiments.reference_stats --dataset=digits --split=train --network=digits"
)


@pytest.fixture(scope="module")
def net() -> DigitsFeatures:
    return DigitsFeatures()


@pytest.fixture(scope="module")
def data_config(digits_data_dir) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {"name": "digits", "data_dir": digits_data_dir, "image_size": 8, "label_key": ""}
    )


@pytest.fixture(scope="module")
def train_ref(net, data_config) -> reference.ReferenceStats:
    return reference.compute_reference_stats(net, data_config, "train")


@pytest.fixture(scope="module")
def test_ref(net, data_config) -> reference.ReferenceStats:
    return reference.compute_reference_stats(net, data_config, "test")


@dataclasses.dataclass
class _OtherNetwork:
    name: str = "digits"
    fingerprint: str = "0123456789abcdef"
    feature_dim: int = 64


def _fd(a: metrics.FeatureStats, b: metrics.FeatureStats) -> float:
    return metrics.frechet_distance(a.mean, a.cov, b.mean, b.cov)


def test_reference_stats_cover_every_image_of_the_split(net, data_config, train_ref):
    images, _ = pipeline.eval_images(data_config, "train")
    features, _ = net(images)
    assert (
        train_ref.num_images
        == len(images)
        == pipeline.dataset_info(data_config).num_examples["train"]
    )
    features = features.astype(np.float64)
    np.testing.assert_allclose(train_ref.stats.mean, features.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(train_ref.stats.cov, np.cov(features, rowvar=False), atol=1e-9)


def test_reading_in_chunks_drops_no_remainder(net, data_config, train_ref, monkeypatch):
    monkeypatch.setattr(reference, "READ_CHUNK", 100)  # 1438 = 14 * 100 + 38.
    chunked = reference.compute_reference_stats(net, data_config, "train")
    assert chunked.num_images == train_ref.num_images
    np.testing.assert_allclose(chunked.stats.mean, train_ref.stats.mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(chunked.stats.cov, train_ref.stats.cov, rtol=1e-9, atol=1e-9)


def test_fd_floor_of_real_test_digits_is_far_below_noise_and_blank_images(net, train_ref, test_ref):
    floor = _fd(test_ref.stats, train_ref.stats)
    rng = np.random.default_rng(0)
    n = test_ref.num_images
    noise = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    black = np.zeros((n, 8, 8, 1), np.uint8)
    noise_fd = _fd(metrics.FeatureStats.from_features(net(noise)[0]), train_ref.stats)
    # All-black features have zero covariance: FD is the mean term plus Tr(C_train).
    black_fd = _fd(metrics.FeatureStats.from_features(net(black)[0]), train_ref.stats)
    print(
        f"digits FD floor (test vs train) {floor:.3f}, noise {noise_fd:.1f}, black {black_fd:.1f}"
    )
    assert 0 < floor < 10
    assert noise_fd > 100 * floor and black_fd > 100 * floor


def test_provenance_round_trips_through_the_file(train_ref, net, tmp_path):
    path = str(tmp_path / "ref.npz")
    reference.save_reference_stats(path, train_ref)
    loaded = reference.load_reference_stats(
        path, expected_network=net, dataset="digits", split="train"
    )
    assert loaded.provenance() == train_ref.provenance()
    assert loaded.network_fingerprint == net.fingerprint and loaded.tfds_version == "1.0.0"
    assert loaded.image_shape == (8, 8, 1) and loaded.num_images == 1438
    np.testing.assert_array_equal(loaded.stats.mean, train_ref.stats.mean)
    np.testing.assert_array_equal(loaded.stats.cov, train_ref.stats.cov)
    assert os.listdir(tmp_path) == ["ref.npz"]  # No temporary file left behind.


def test_default_path_lies_in_the_tfds_data_dir(data_config, digits_data_dir):
    assert reference.default_reference_path(data_config, "train", "digits") == os.path.join(
        digits_data_dir, "reference_stats", "digits_train_digits.npz"
    )
    config = ml_collections.ConfigDict({"name": "imagenet_resized/32x32", "data_dir": "/d"})
    assert reference.default_reference_path(config, "train[:50%]", "inception") == (
        "/d/reference_stats/imagenet_resized_32x32_train_50_inception.npz"
    )


def test_a_missing_file_is_refused_with_the_command_that_creates_it(net, tmp_path):
    path = str(tmp_path / "absent.npz")
    with pytest.raises(reference.ReferenceStatsError, match=FIX + re.escape(f" --output={path}")):
        reference.load_reference_stats(path, expected_network=net, dataset="digits", split="train")


def test_statistics_of_another_network_are_refused_with_the_command(train_ref, net, tmp_path):
    path = str(tmp_path / "ref.npz")
    reference.save_reference_stats(path, train_ref)
    with pytest.raises(reference.ReferenceStatsError, match=f"fingerprint .*{FIX}"):
        reference.load_reference_stats(path, expected_network=_OtherNetwork())


def test_statistics_of_another_split_are_refused(train_ref, net, tmp_path):
    path = str(tmp_path / "ref.npz")
    reference.save_reference_stats(path, train_ref)
    with pytest.raises(reference.ReferenceStatsError, match=r"split 'train', not 'test'"):
        reference.load_reference_stats(path, expected_network=net, split="test")


def test_tampered_statistics_fail_the_hash_check(train_ref, net, tmp_path):
    path = str(tmp_path / "ref.npz")
    reference.save_reference_stats(path, train_ref)
    with np.load(path) as data:
        contents = dict(data)
    contents["mean"] = contents["mean"] + 1e-9
    with open(path, "wb") as f:
        np.savez(f, **contents)
    with pytest.raises(reference.ReferenceStatsError, match=f"corrupted .*sha256.*{FIX}"):
        reference.load_reference_stats(path, expected_network=net)


def test_a_truncated_file_is_refused_as_corrupted(train_ref, net, tmp_path):
    path = str(tmp_path / "ref.npz")
    reference.save_reference_stats(path, train_ref)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(
        reference.ReferenceStatsError, match=r"corrupted .*experiments\.reference_stats"
    ):
        reference.load_reference_stats(path, expected_network=net)


def test_an_unknown_split_is_refused_with_the_splits_that_exist(net, data_config):
    with pytest.raises(ValueError, match=r"no split 'validation'; use one of \['test', 'train'\]"):
        reference.compute_reference_stats(net, data_config, "validation")


def test_command_line_tool_writes_loadable_statistics(digits_data_dir, net, test_ref, tmp_path):
    output = str(tmp_path / "cli.npz")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.reference_stats",
            "--dataset=digits",
            "--split=test",
            "--network=digits",
            f"--data_dir={digits_data_dir}",
            f"--output={output}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {output}: 359 images" in result.stdout
    loaded = reference.load_reference_stats(output, expected_network=net)
    np.testing.assert_allclose(loaded.stats.mean, test_ref.stats.mean, rtol=1e-9, atol=1e-9)
