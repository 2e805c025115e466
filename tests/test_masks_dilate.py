"""eo.masks.dilate (row-decomposed disk) against scipy's binary dilation with the same disk, and the haze
test against its formula: the cloud buffer must cover exactly the pixels within the radius."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from eo.masks import HOT_INTERCEPT, HOT_SLOPE, dilate, haze_mask


def disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


@pytest.mark.parametrize("radius", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (4, 3), (37, 41), (200, 129)])
def test_dilate_is_the_disk_dilation(radius, shape):
    rng = np.random.default_rng(radius * 100 + shape[0])
    for share in (0.002, 0.05, 0.4):
        mask = rng.random(shape) < share
        mask[0, 0] = True  # at least one pixel, at an edge (no wrap-around)
        expected = ndimage.binary_dilation(mask, structure=disk(radius))
        assert np.array_equal(dilate(mask, radius), expected)


def test_dilate_radius_zero_and_empty_masks_are_copies():
    mask = np.zeros((5, 6), bool)
    out = dilate(mask, 3)
    assert not out.any() and out is not mask
    mask[2, 3] = True
    assert np.array_equal(dilate(mask, 0), mask)


def test_haze_mask_is_the_hot_line_buffered():
    rng = np.random.default_rng(3)
    blue = (rng.random((90, 70)) * 0.3).astype(np.float32)
    red = (rng.random((90, 70)) * 0.3).astype(np.float32)
    blue[::7, ::5] = np.nan
    hot = blue - HOT_SLOPE * red - HOT_INTERCEPT
    with np.errstate(invalid="ignore"):
        above = hot > 0  # NaN never flags
    assert np.array_equal(haze_mask(blue, red, 2), ndimage.binary_dilation(above, structure=disk(2)))
