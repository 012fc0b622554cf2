"""Conversions between model space and image files: [-1, 1] floats <-> uint8, grids, PNGs."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) floats in [-1, 1] -> uint8 in [0, 255], rounding to nearest."""
    scaled = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, *, ncols: int | None = None, padding: int = 1) -> np.ndarray:
    """Tile uint8 (N, H, W, C) images into one uint8 (rows*(H+p)+p, cols*(W+p)+p, C) image."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c), np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, ncols)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_png(path: str, image: np.ndarray, *, scale: int = 1) -> None:
    """Write uint8 (H, W, C) with C in {1, 3} as PNG, enlarged `scale` times (nearest).

    Atomic: written to a temporary file beside `path`, then renamed over it.
    """
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    tmp = f"{path}.tmp.png"
    pil.save(tmp)
    os.replace(tmp, path)


def save_grid(path: str, images: np.ndarray, *, ncols: int | None = None) -> None:
    """Save uint8 (N, H, W, C) as one PNG grid, upscaled so small images stay legible."""
    grid = make_grid(images, ncols=ncols)
    save_png(path, grid, scale=max(1, 512 // max(grid.shape[:2])))
