"""Frechet distance, Inception score, precision/recall and streaming statistics: known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from diffusion_jax.evaluation import metrics


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------- StatsAccumulator


def test_streaming_stats_over_uneven_batches_equal_numpy_mean_and_cov():
    x = np.random.default_rng(0).normal(size=(200, 5)) * [1, 2, 3, 4, 5]
    acc = metrics.StatsAccumulator()
    for batch in np.split(x, [1, 8, 8, 58]):  # Sizes 1, 7, 0, 50, 142.
        acc.update(batch)
    stats = acc.result()
    assert stats.count == 200
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-12, atol=1e-14)


def test_streaming_stats_stay_exact_under_a_large_common_offset():
    x = np.random.default_rng(1).normal(size=(20_000, 16))
    acc = metrics.StatsAccumulator()
    for batch in np.array_split(x + 1e4, 13):
        acc.update(batch)
    stats = acc.result()
    # A sum-of-squares formulation would be off by ~1e-5 here (1e12 totals in float64).
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), atol=1e-9)
    np.testing.assert_allclose(stats.mean - 1e4, x.mean(axis=0), atol=1e-9)


def test_feature_stats_from_float32_features_are_float64():
    x = np.random.default_rng(2).normal(size=(50, 3)).astype(np.float32)
    stats = metrics.FeatureStats.from_features(x)
    assert stats.mean.dtype == np.float64 and stats.cov.dtype == np.float64
    np.testing.assert_allclose(stats.cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_accumulator_refuses_too_few_vectors_and_mixed_dimensions():
    acc = metrics.StatsAccumulator()
    acc.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        acc.result()
    with pytest.raises(ValueError, match="dimension 3, expected 4"):
        acc.update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="dimension 4, expected 5"):
        metrics.StatsAccumulator(feature_dim=5).update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.full((2, 4), np.nan))


# ---------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_of_identical_statistics_is_zero():
    x = np.random.default_rng(3).normal(size=(500, 64))
    stats = metrics.FeatureStats.from_features(x)
    assert metrics.frechet_distance(stats.mean, stats.cov, stats.mean, stats.cov) < 1e-6


def test_frechet_distance_of_identical_singular_statistics_is_zero():
    x = np.random.default_rng(4).normal(size=(20, 64))  # N < D: covariance of rank 19.
    stats = metrics.FeatureStats.from_features(x)
    assert metrics.frechet_distance(stats.mean, stats.cov, stats.mean, stats.cov) < 1e-6


def test_frechet_distance_of_one_dimensional_gaussians_is_the_closed_form():
    fd = metrics.frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])
    )
    assert fd == pytest.approx((1 + 2) ** 2 + (2 - 3) ** 2, rel=1e-12)


def test_frechet_distance_of_non_commuting_2x2_covariances_is_the_closed_form():
    c1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    c2 = np.array([[1.0, -0.4], [-0.4, 3.0]])
    assert not np.allclose(c1 @ c2, c2 @ c1)
    mu1, mu2 = np.array([0.5, -1.0]), np.array([1.5, 2.0])
    # For 2x2 M with positive eigenvalues, Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)).
    tr_sqrt = math.sqrt(np.trace(c1 @ c2) + 2 * math.sqrt(np.linalg.det(c1) * np.linalg.det(c2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    assert metrics.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_rank_one_covariances_is_the_closed_form():
    v, w = np.array([1.0, 2.0, 0.0]), np.array([0.5, -1.0, 2.0])
    # C1 C2 = v (v.w) w^T has the single non-zero eigenvalue (v.w)^2.
    expected = v @ v + w @ w - 2 * abs(v @ w)
    fd = metrics.frechet_distance(np.zeros(3), np.outer(v, v), np.zeros(3), np.outer(w, w))
    assert fd == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_with_a_rank_deficient_covariance_is_the_closed_form():
    c1, c2 = np.diag([1.0, 0.0, 4.0]), np.diag([4.0, 9.0, 4.0])
    expected = (1 - 2) ** 2 + (0 - 3) ** 2 + 0.0 + 3.0**2  # Means differ by 3 in one axis.
    fd = metrics.frechet_distance(np.zeros(3), c1, np.array([0.0, 0.0, 3.0]), c2)
    assert fd == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_on_random_full_rank_covariances():
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    c1, c2 = _random_spd(rng, 8), _random_spd(rng, 8)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * covmean)
    assert metrics.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_symmetric_real_and_non_negative():
    rng = np.random.default_rng(6)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    c1, c2 = _random_spd(rng, 16), _random_spd(rng, 16)
    ab, ba = metrics.frechet_distance(mu1, c1, mu2, c2), metrics.frechet_distance(mu2, c2, mu1, c1)
    assert type(ab) is float and ab > 0
    assert ab == pytest.approx(ba, rel=1e-10)


def test_frechet_distance_refuses_mismatched_dimensions():
    with pytest.raises(ValueError, match="same feature network"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------- Inception score


def test_inception_score_of_confident_uniform_class_predictions_is_the_number_of_classes():
    labels = np.arange(1000) % 10  # Every split of 100 holds each class 10 times.
    probs = np.eye(10)[labels]
    mean, std = metrics.inception_score(probs, splits=10, from_logits=False)
    assert mean == pytest.approx(10.0, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    mean_from_logits, _ = metrics.inception_score(50.0 * probs, splits=10)
    assert mean_from_logits == pytest.approx(10.0, rel=1e-9)


def test_inception_score_of_identical_predictions_is_one():
    logits = np.tile(np.random.default_rng(7).normal(size=(1, 10)), (100, 1))
    mean, std = metrics.inception_score(logits, splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_a_hand_computed_example():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    # p(y) = (0.75, 0.25); KL of row 1 = log(4/3), of row 2 = 0.5 log(2/3) + 0.5 log 2.
    kl = [math.log(4 / 3), 0.5 * math.log(2 / 3) + 0.5 * math.log(2)]
    mean, _ = metrics.inception_score(probs, splits=1, from_logits=False)
    assert mean == pytest.approx(math.exp(np.mean(kl)), rel=1e-12)


def test_inception_score_averages_per_split_scores():
    # First split: one repeated prediction (score 1); second: 5 confident classes (score 5).
    probs = np.concatenate([np.tile(np.eye(5)[:1], (5, 1)), np.eye(5)])
    mean, std = metrics.inception_score(probs, splits=2, from_logits=False)
    assert mean == pytest.approx(3.0, rel=1e-12) and std == pytest.approx(2.0, rel=1e-12)


def test_inception_score_refuses_more_splits_than_predictions_and_bad_probabilities():
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(np.zeros((5, 3)), splits=10)
    with pytest.raises(ValueError, match="from_logits=True"):
        metrics.inception_score(np.ones((5, 3)), splits=1, from_logits=False)


# ---------------------------------------------------------------------------- precision/recall


def test_precision_and_recall_of_identical_sets_are_one():
    x = np.random.default_rng(8).normal(size=(300, 8))
    assert metrics.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_and_recall_of_far_apart_clusters_are_zero():
    rng = np.random.default_rng(9)
    real, fake = rng.normal(size=(100, 4)), rng.normal(size=(80, 4)) + 100.0
    assert metrics.precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_a_generator_covering_one_of_two_modes_has_full_precision_and_partial_recall():
    # Real: 30 points 0..29 on a line (mode A) and 10 far away (mode B); fake: mode A exactly.
    mode_a = np.stack([np.arange(30.0), np.zeros(30)], axis=1)
    mode_b = np.stack([np.arange(10.0), np.full(10, 1000.0)], axis=1)
    real = np.concatenate([mode_a, mode_b])
    fake = mode_a.copy()
    # Fake balls (3rd neighbour: radius 2 inside, 3 at the ends) cover all of A, none of B.
    assert metrics.precision_recall(real, fake, k=3) == (1.0, 0.75)
    # Swapping the roles swaps the values: the metric is asymmetric by design.
    assert metrics.precision_recall(fake, real, k=3) == (0.75, 1.0)


def test_ball_radii_are_the_distance_to_the_kth_nearest_other_point():
    real = np.array([0.0, 1.0, 3.0, 6.0, 10.0])[:, None]
    fake = np.array([-1.5, -0.5, 11.5, 14.5])[:, None]
    # k=1 radii: 1, 1, 2, 3, 4 -> -0.5 (within 1 of 0) and 11.5 (within 4 of 10) are inside.
    assert metrics.precision_recall(real, fake, k=1)[0] == 0.5
    # k=2 radii: 3, 2, 3, 4, 7 -> all four fake points are inside.
    assert metrics.precision_recall(real, fake, k=2)[0] == 1.0


def test_blocked_distances_give_the_same_precision_and_recall():
    rng = np.random.default_rng(11)
    real, fake = rng.normal(size=(257, 6)), rng.normal(size=(131, 6)) * 1.3 + 0.2
    whole = metrics.precision_recall(real, fake, k=5)
    blocked = metrics.precision_recall(real, fake, k=5, max_block_elements=1000)
    assert blocked == whole
    assert 0.0 < whole[0] < 1.0 and 0.0 < whole[1] < 1.0


def test_precision_recall_refuses_sets_smaller_than_k():
    with pytest.raises(ValueError, match="lower k"):
        metrics.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
