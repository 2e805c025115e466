"""PNG thumbnails and model inputs: true colour from reflectance, and the change overlay.

Before and after are stretched *together* (one 2–98 % range over the valid pixels of both), so a
brightness difference in the thumbnails is a real difference, not an artefact of two stretches. When
too few valid pixels exist the fixed 0–0.3 reflectance range is used.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

FIXED_RANGE = (0.0, 0.3)
PERCENTILES = (2.0, 98.0)
# The thumbnail canvas is at most this many pixels a side (every f-th pixel of larger areas).
MAX_SIDE = 1024
CLASS_COLOURS = {  # RGB tint per change class code (workers.spectral.CLASS_CODES)
    1: (30, 120, 255),  # water change: blue
    2: (255, 140, 0),  # new built-up / bare: orange
    3: (230, 30, 30),  # vegetation loss: red
    4: (40, 220, 60),  # vegetation gain: green
}
TINT_ALPHA = 0.65
OUTSIDE_DIM = 0.45  # pixels outside the area are dimmed so the area stands out


@dataclass
class Png:
    data: bytes
    width: int
    height: int
    # Where the map part lies (finding_images.bounds): {"crs", "bbox", "map_height_px"}; None: not a map.
    bounds: dict[str, Any] | None = None


def stretch_range(*rgbs: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float]:
    """One (low, high) reflectance range for all given (3, H, W) arrays (callers pass the thumbnail-size
    canvas of a large area, so this sorts at most a few million values)."""
    samples = []
    for rgb in rgbs:
        values = rgb[:, valid] if valid is not None else rgb.reshape(3, -1)
        values = values[np.isfinite(values)]
        if values.size:
            samples.append(values)
    if not samples:
        return FIXED_RANGE
    values = np.concatenate(samples)
    if values.size < 100:
        return FIXED_RANGE
    low, high = np.percentile(values, PERCENTILES)
    if not np.isfinite(low) or not np.isfinite(high) or high - low < 1e-3:
        return FIXED_RANGE
    return float(low), float(high)


def to_uint8(rgb: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """(3, H, W) reflectance -> (H, W, 3) uint8; no data is black."""
    low, high = value_range
    scaled = (np.nan_to_num(rgb, nan=low) - low) / (high - low)
    out = (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def overlay(after_rgb8: np.ndarray, class_map: np.ndarray, aoi: np.ndarray) -> np.ndarray:
    """The after image with changed pixels tinted by class (``class_map``: uint8 (H, W), 0 = none, else the
    class code of a kept region) and the outside of the area dimmed."""
    out = after_rgb8.astype(np.float32)
    out[~aoi] *= OUTSIDE_DIM
    for code, colour in CLASS_COLOURS.items():
        where = class_map == code
        if where.any():
            out[where] = (1 - TINT_ALPHA) * out[where] + TINT_ALPHA * np.asarray(colour, dtype=np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def encode_png(image: Image.Image) -> Png:
    """PNG of an RGB image as it is (sizes are decided by :mod:`workers.mapframe`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)  # optimize=True: ~2x the time, no smaller here
    return Png(buffer.getvalue(), image.size[0], image.size[1])


def rgb_of(reflectance: dict[str, np.ndarray]) -> np.ndarray:
    """(3, H, W) true colour; a scene without blue/green is shown in red only (grey)."""
    if all(b in reflectance for b in ("red", "green", "blue")):
        return np.stack([reflectance["red"], reflectance["green"], reflectance["blue"]])
    return np.stack([reflectance["red"]] * 3)
