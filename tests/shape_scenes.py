"""Seeded synthetic scenes for the trained ViT (models/train_vit.py, models/tiny_vit.onnx):
one shape — square, circle, triangle or cross — of a random colour, position and size on
textured noise; the class is the shape. numpy only, so the test, the training script and
the docs figure draw the same scenes from the same seed.

The texture is a smooth random field (a coarse grid of random colours, bilinearly
upsampled) plus pixel noise, so the background is no flat colour a model could subtract,
and the object's box is known exactly: where its relevance should be.
"""

from __future__ import annotations

import numpy as np

CLASSES = ("square", "circle", "triangle", "cross")
SIZE = 32
# The model's input is (pixel - MEAN) / STD on pixels in [0, 1] (models/tiny_vit.onnx's metadata).
MEAN, STD = 0.5, 0.25


def _upsample(coarse: np.ndarray, size: int) -> np.ndarray:
    """(n, 3, g, g) -> (n, 3, size, size) by bilinear interpolation (cell centres aligned)."""
    g = coarse.shape[-1]
    pos = (np.arange(size) + 0.5) * g / size - 0.5
    lo = np.clip(np.floor(pos).astype(int), 0, g - 1)
    hi = np.clip(lo + 1, 0, g - 1)
    w = np.clip(pos - lo, 0.0, 1.0)
    rows = coarse[..., lo, :] * (1 - w)[:, None] + coarse[..., hi, :] * w[:, None]
    return rows[..., lo] * (1 - w) + rows[..., hi] * w


def shape_mask(cls: int, x1: int, y1: int, s: int, size: int = SIZE) -> np.ndarray:
    """The pixels of shape `cls` inside the s x s box at (x1, y1), as a (size, size) bool mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    u, v = (xx - x1 + 0.5) / s, (yy - y1 + 0.5) / s  # box coordinates in (0, 1)
    inbox = (u > 0) & (u < 1) & (v > 0) & (v < 1)
    if cls == 0:
        return inbox
    if cls == 1:
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if cls == 2:  # apex at the top centre, base along the bottom
        return inbox & (np.abs(u - 0.5) <= 0.5 * v)
    if cls == 3:  # a plus sign, arms a third of the side wide
        return inbox & ((np.abs(u - 0.5) <= 1 / 6) | (np.abs(v - 0.5) <= 1 / 6))
    raise ValueError(f"no shape class {cls}")


def scenes(n: int, rng: np.random.Generator, size: int = SIZE, sides=(10, 19)):
    """n scenes (n, 3, size, size) float32 pixels in [0, 1], their classes (n,) int64 and
    boxes (n, 4) int (x1, y1, x2, y2; x2, y2 exclusive)."""
    coarse = rng.uniform(0.2, 0.8, (n, 3, 4, 4))
    images = _upsample(coarse, size) + rng.normal(0.0, 0.08, (n, 3, size, size))
    labels = rng.integers(0, len(CLASSES), n)
    boxes = np.zeros((n, 4), int)
    for i in range(n):
        s = int(rng.integers(*sides))
        x1, y1 = (int(v) for v in rng.integers(0, size - s + 1, 2))
        mask = shape_mask(int(labels[i]), x1, y1, s, size)
        colour = rng.uniform(0.0, 1.0, 3)
        # Visible against the background under it: at least one channel far from it.
        under = images[i][:, mask].mean(axis=1)
        if np.abs(colour - under).max() < 0.4:
            k = int(rng.integers(0, 3))
            colour[k] = 0.0 if under[k] > 0.5 else 1.0
        images[i][:, mask] = colour[:, None] + rng.normal(0.0, 0.03, (3, int(mask.sum())))
        boxes[i] = (x1, y1, x1 + s, y1 + s)
    return np.clip(images, 0.0, 1.0).astype(np.float32), labels.astype(np.int64), boxes


def normalise(images: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] -> the model's input, as its preprocessing metadata says."""
    return ((images - MEAN) / STD).astype(np.float32)
