"""Sample-quality metrics on features and logits: Frechet distance, IS, precision/recall.

Everything here is numpy in float64 on the host: the feature networks run on the accelerator,
these reductions are small (D x D at most) and need the precision.

    acc = StatsAccumulator()
    for images in batches:
        features, logits = feature_net(images)
        acc.update(features)
    stats = acc.result()                                  # FeatureStats(mean, cov, count)
    fd = frechet_distance(stats.mean, stats.cov, ref.mean, ref.cov)
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Pairwise-distance blocks hold at most this many float64 entries (2**24: 128 MiB).
DEFAULT_MAX_BLOCK_ELEMENTS = 2**24


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """First and second moments of a set of feature vectors.

    mean: float64 (D,); cov: float64 (D, D), unbiased (ddof=1, like np.cov and pytorch-fid);
    count: number of feature vectors.
    """

    mean: np.ndarray
    cov: np.ndarray
    count: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        """(N, D) features -> their FeatureStats (N >= 2)."""
        acc = StatsAccumulator()
        acc.update(features)
        return acc.result()


class StatsAccumulator:
    """Streaming mean and covariance of feature batches, exact in float64.

    Each batch is centred on its own mean and merged with the running (count, mean, M2) by
    Chan et al.'s pairwise update, so no sum of raw squares is ever formed: a large common
    offset (features + 1e4) or 1e5 x 2048 features lose no precision to cancellation.
    """

    def __init__(self, feature_dim: int | None = None) -> None:
        """feature_dim: D, checked on every update; None = taken from the first batch."""
        self.count = 0
        self.feature_dim = feature_dim
        self._mean: np.ndarray | None = None  # (D,)
        self._m2: np.ndarray | None = None  # (D, D): sum of outer products of deviations.

    def update(self, features: np.ndarray) -> None:
        """Adds a batch of float features (B, D); B may be 0."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (B, D), got shape {x.shape}")
        if self.feature_dim is None:
            self.feature_dim = x.shape[1]
        if x.shape[1] != self.feature_dim:
            raise ValueError(
                f"features have dimension {x.shape[1]}, expected {self.feature_dim}; use one "
                "feature network per accumulator"
            )
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain NaN or inf; check the images and the network")
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        if self._mean is None or self._m2 is None:
            self.count, self._mean, self._m2 = n_b, mean_b, m2_b
            return
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def result(self) -> FeatureStats:
        """The FeatureStats of everything added so far (needs at least 2 vectors)."""
        if self._mean is None or self._m2 is None or self.count < 2:
            raise ValueError(
                f"a covariance needs at least 2 feature vectors, got {self.count}; "
                "evaluate more images"
            )
        m2 = (self._m2 + self._m2.T) / 2  # Exactly symmetric despite rounding.
        return FeatureStats(mean=self._mean.copy(), cov=m2 / (self.count - 1), count=self.count)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD (D, D) matrix (negative rounding -> 0)."""
    eigvals, eigvecs = np.linalg.eigh(cov)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2) (FID on Inception features).

    d = |mu1 - mu2|^2 + Tr(C1) + Tr(C2) - 2 Tr((C1 C2)^(1/2)).

    Tr((C1 C2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix F^T C2 F, where C1 = F F^T (F the Cholesky factor, or C1^(1/2) from
    an eigendecomposition when C1 is singular); it has the same eigenvalues as C2 C1.
    Unlike scipy.linalg.sqrtm of the non-symmetric C1 C2 (pytorch-fid), this needs no eps
    offset for singular covariances (N < D, rank-deficient features), never produces
    imaginary parts, and eigenvalues that rounding makes slightly negative are clipped to 0.
    Cost for D = 2048: one Cholesky and one symmetric eigenvalue solve, seconds on a CPU.

    Args:
      mu1, mu2: (D,) means.
      cov1, cov2: (D, D) symmetric PSD covariances.

    Returns:
      The distance as a Python float >= 0 (float64 arithmetic throughout).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            "need means (D,) and covariances (D, D) of one D, got "
            f"{mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}; compare statistics of the "
            "same feature network"
        )
    if not all(np.all(np.isfinite(a)) for a in (mu1, mu2, cov1, cov2)):
        raise ValueError("statistics contain NaN or inf; recompute them from finite features")
    cov1, cov2 = (cov1 + cov1.T) / 2, (cov2 + cov2.T) / 2
    try:
        factor = np.linalg.cholesky(cov1)  # Several times cheaper than an eigendecomposition.
    except np.linalg.LinAlgError:  # Singular (or rounding made it indefinite).
        factor = _psd_sqrt(cov1)
    middle = factor.T @ cov2 @ factor
    eigvals = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sum(np.sqrt(np.clip(eigvals, 0.0, None))))
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # Rounding can take identical statistics to -1e-13.


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def inception_score(
    predictions: np.ndarray, splits: int = 10, *, from_logits: bool = True
) -> tuple[float, float]:
    """Inception score (Salimans et al. 2016), computed as in TF-GAN / the original code.

    The N predictions are cut into `splits` contiguous parts [i*N//splits, (i+1)*N//splits);
    each part scores exp(mean_x KL(p(y|x) || p(y))) with p(y) the part's mean prediction.

    Args:
      predictions: (N, K) logits (from_logits=True) or class probabilities summing to 1.
      splits: number of parts, 1 <= splits <= N.
      from_logits: whether `predictions` are logits (converted by a float64 log-softmax).

    Returns:
      (mean, std) of the per-part scores (std with ddof=0, as TF-GAN); each in [1, K].
    """
    p = np.asarray(predictions, np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"predictions must be (N, K), got shape {p.shape}")
    n = p.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"need 1 <= splits <= N = {n}, got splits={splits}")
    if not np.all(np.isfinite(p)):
        raise ValueError("predictions contain NaN or inf; check the images and the network")
    if from_logits:
        log_p = _log_softmax(p)
        p = np.exp(log_p)
    else:
        if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError(
                "probabilities must be >= 0 and sum to 1 per row; pass from_logits=True for logits"
            )
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    scores = []
    for i in range(splits):
        part = slice(i * n // splits, (i + 1) * n // splits)
        p_part, log_p_part = p[part], log_p[part]
        p_y = p_part.mean(axis=0)
        # 0 * log 0 = 0: classes a prediction gives no mass contribute nothing (where p > 0,
        # p_y > 0 too, so the logs kept are finite).
        log_p_part = np.where(p_part > 0, log_p_part, 0.0)
        log_py = np.log(np.where(p_y > 0, p_y, 1.0))
        terms = p_part * (log_p_part - log_py)
        scores.append(float(np.exp(np.mean(np.sum(terms, axis=1)))))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _row_blocks(num_rows: int, num_cols: int, max_block_elements: int) -> list[slice]:
    rows = max(1, max_block_elements // max(num_cols, 1))
    return [slice(s, min(s + rows, num_rows)) for s in range(0, num_rows, rows)]


def _squared_distances(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray):
    """(n, D), (m, D) -> (n, m) squared Euclidean distances (clipped at 0 after rounding)."""
    return np.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T), 0.0)


def _knn_radii_sq(x: np.ndarray, x_sq: np.ndarray, k: int, max_block_elements: int):
    """(N, D) -> (N,) squared distance of each point to its k-th nearest other point."""
    radii = np.empty(len(x))
    for rows in _row_blocks(len(x), len(x), max_block_elements):
        d2 = _squared_distances(x[rows], x_sq[rows], x, x_sq)
        # Index k of the sorted row skips exactly one zero: the point itself.
        radii[rows] = np.partition(d2, k, axis=1)[:, k]
    return radii


def _coverage(
    queries: np.ndarray,
    q_sq: np.ndarray,
    centres: np.ndarray,
    c_sq: np.ndarray,
    radii_sq: np.ndarray,
    max_block_elements: int,
) -> float:
    """Fraction of query points inside at least one ball (centres, radii) (inclusive)."""
    inside = np.zeros(len(queries), bool)
    for rows in _row_blocks(len(queries), len(centres), max_block_elements):
        d2 = _squared_distances(queries[rows], q_sq[rows], centres, c_sq)
        inside[rows] = np.any(d2 <= radii_sq[None, :], axis=1)
    return float(np.mean(inside))


def precision_recall(
    real: np.ndarray,
    fake: np.ndarray,
    k: int = 3,
    *,
    max_block_elements: int = DEFAULT_MAX_BLOCK_ELEMENTS,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of fake against real features.

    Each point's ball has as radius the distance to its k-th nearest neighbour within its own
    set (itself excluded). Precision: fraction of fake points inside some real ball. Recall:
    fraction of real points inside some fake ball. Distances are computed in float64 in row
    blocks of at most max_block_elements entries, so memory stays bounded for any N, M.

    Args:
      real: (N, D) features of real images, N > k.
      fake: (M, D) features of generated images, M > k.
      k: neighbourhood size (3 in the paper).
      max_block_elements: largest distance block held at once.

    Returns:
      (precision, recall), each in [0, 1].
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"need real (N, D) and fake (M, D) features of one D, got {real.shape} and "
            f"{fake.shape}; use the same feature network for both"
        )
    if k < 1 or len(real) <= k or len(fake) <= k:
        raise ValueError(
            f"need k >= 1 and more than k points per set, got k={k}, N={len(real)}, "
            f"M={len(fake)}; evaluate more images or lower k"
        )
    if not (np.all(np.isfinite(real)) and np.all(np.isfinite(fake))):
        raise ValueError("features contain NaN or inf; check the images and the network")
    # Distances are translation invariant; centring keeps |a|^2 + |b|^2 - 2ab from cancelling.
    centre = real.mean(axis=0)
    real, fake = real - centre, fake - centre
    real_sq, fake_sq = _squared_norms(real), _squared_norms(fake)
    real_radii = _knn_radii_sq(real, real_sq, k, max_block_elements)
    fake_radii = _knn_radii_sq(fake, fake_sq, k, max_block_elements)
    precision = _coverage(fake, fake_sq, real, real_sq, real_radii, max_block_elements)
    recall = _coverage(real, real_sq, fake, fake_sq, fake_radii, max_block_elements)
    return precision, recall
