"""Reads onto the file's own grid skip GDAL's warper and give the very same pixels (eo/cog.py)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling

from eo import cog

ORIGIN = (500000.0, 5100000.0)


def _write(path, nodata, count=1, mask=False):
    rng = np.random.default_rng(7)
    data = rng.integers(0, 5000, (count, 300, 400)).astype(np.uint16)
    data[:, :20, :20] = 0
    profile = dict(driver="GTiff", width=400, height=300, count=count, dtype="uint16", crs="EPSG:32634",
                   transform=Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1]), tiled=True, blockxsize=128,
                   blockysize=128, nodata=nodata)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if mask:
            m = np.full((300, 400), 255, dtype=np.uint8)
            m[100:150, 100:150] = 0
            dst.write_mask(m)
    return data


def _both(path, bounds, indexes, resampling=Resampling.nearest):
    with rasterio.open(path) as src:
        fast = cog._read(src, str(path), None, "EPSG:32634", 10.0, resampling, bounds, indexes, aoi_mask=False)
    original = cog._aligned_window
    cog._aligned_window = lambda *a: None
    try:
        with rasterio.open(path) as src:
            warped = cog._read(src, str(path), None, "EPSG:32634", 10.0, resampling, bounds, indexes, aoi_mask=False)
    finally:
        cog._aligned_window = original
    return fast, warped


@pytest.mark.parametrize("nodata", [0, None])
@pytest.mark.parametrize("cells", [(0, 0, 400, 300), (37, 11, 200, 150), (-25, -40, 120, 90), (350, 260, 100, 80),
                                   (-10, -10, 420, 320), (500, 10, 30, 30)])
def test_a_window_of_the_files_grid_reads_what_the_warper_reads(tmp_path, nodata, cells):
    path = tmp_path / "band.tif"
    data = _write(path, nodata)
    col, row, width, height = cells  # on the file's grid; partly or wholly outside the file too
    left, top = ORIGIN[0] + col * 10, ORIGIN[1] - row * 10
    bounds = (left, top - height * 10, left + width * 10, top)
    fast, warped = _both(path, bounds, 1)
    assert fast.array.shape == warped.array.shape == (1, height, width)
    assert fast.array.dtype == warped.array.dtype
    np.testing.assert_array_equal(fast.array, warped.array)
    assert fast.transform == warped.transform and fast.nodata == warped.nodata
    inside = data[0, max(row, 0):row + height, max(col, 0):col + width]
    if inside.size:  # and the pixels are the file's own
        np.testing.assert_array_equal(fast.array[0, max(-row, 0):max(-row, 0) + inside.shape[0],
                                                 max(-col, 0):max(-col, 0) + inside.shape[1]], inside)


def test_several_bands_at_once(tmp_path):
    path = tmp_path / "bands.tif"
    _write(path, 0, count=3)
    fast, warped = _both(path, (ORIGIN[0] + 50, ORIGIN[1] - 2000, ORIGIN[0] + 3000, ORIGIN[1] - 30), [3, 1])
    assert fast.array.shape[0] == 2
    np.testing.assert_array_equal(fast.array, warped.array)


def test_off_grid_other_resolution_mask_or_resampling_take_the_warper(tmp_path):
    path = tmp_path / "band.tif"
    _write(path, 0)
    masked = tmp_path / "masked.tif"
    _write(masked, None, mask=True)
    with rasterio.open(path) as src, rasterio.open(masked) as msrc:
        grid = Affine(10, 0, ORIGIN[0] + 100, 0, -10, ORIGIN[1] - 100)
        assert cog._aligned_window(src, src.crs, (10.0, 10.0), grid, Resampling.nearest) is not None
        assert cog._aligned_window(src, src.crs, (10.0, 10.0), grid @ Affine.translation(0.5, 0),
                                   Resampling.nearest) is None
        assert cog._aligned_window(src, src.crs, (20.0, 20.0), grid, Resampling.nearest) is None
        assert cog._aligned_window(src, src.crs, (10.0, 10.0), grid, Resampling.bilinear) is None
        assert cog._aligned_window(src, rasterio.crs.CRS.from_epsg(32635), (10.0, 10.0), grid,
                                   Resampling.nearest) is None
        assert cog._aligned_window(msrc, msrc.crs, (10.0, 10.0), grid, Resampling.nearest) is None
    # the masked file through the warper: its mask applied, as before
    fast, warped = _both(masked, (ORIGIN[0], ORIGIN[1] - 3000, ORIGIN[0] + 4000, ORIGIN[1]), 1)
    np.testing.assert_array_equal(fast.array, warped.array)
    assert (fast.array[0, 100:150, 100:150] == 0).all()
