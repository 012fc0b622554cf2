"""Conversions between model space and image files: [-1, 1] floats <-> uint8, grids, PNGs."""

from __future__ import annotations

import io
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


def encode_png(image: np.ndarray, *, scale: int = 1) -> bytes:
    """uint8 (H, W, C) with C in {1, 3} as the bytes of a PNG, enlarged `scale` times
    (nearest)."""
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_grid(images: np.ndarray, *, ncols: int | None = None) -> bytes:
    """uint8 (N, H, W, C) as the bytes of one PNG grid, upscaled so small images stay
    legible."""
    grid = make_grid(images, ncols=ncols)
    return encode_png(grid, scale=max(1, 512 // max(grid.shape[:2])))


def save_png(path: str, image: np.ndarray, *, scale: int = 1) -> None:
    """Write `encode_png(image, scale=scale)` to the local file `path`.

    Atomic: written to a temporary file beside `path`, then renamed over it.
    """
    _write_atomically(path, encode_png(image, scale=scale))


def save_grid(path: str, images: np.ndarray, *, ncols: int | None = None) -> None:
    """Write `encode_grid(images, ncols=ncols)` to the local file `path`, atomically."""
    _write_atomically(path, encode_grid(images, ncols=ncols))


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.png"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
