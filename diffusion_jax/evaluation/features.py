"""The interface every feature network used for FD/FID, IS and precision/recall implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class FeatureNetwork(Protocol):
    """Maps uint8 images to features (for Frechet distance, precision/recall) and logits (IS).

    name: 'digits' | 'inception'; fingerprint: the first 16 hex digits of the sha256 of the
    weights, stored with reference statistics so stats from other weights are refused.
    """

    name: str
    fingerprint: str
    feature_dim: int

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, H, W, C) -> (features float32 (B, feature_dim), logits float32 (B, K))."""
        ...
