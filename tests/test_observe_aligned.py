"""eo.observe reads a window on the mask file's own grid without the warper only when that gives the warper's
pixels: a file with an internal mask (pixels the mask hides are no-data to the warper) takes the warped view,
a file with only a no-data value keeps the plain window read, and both paths agree on either file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds

from eo import observe

ORIGIN = (500000.0, 5100000.0)
SIZE = 20.0  # an SCL file's pixel size
HIDDEN = (slice(100, 150), slice(100, 150))  # rows, columns the internal mask hides


def _write_scl(path, *, nodata, mask):
    rng = np.random.default_rng(11)
    data = rng.integers(1, 12, (300, 400)).astype(np.uint8)  # SCL classes 1..11, never 0 (no data)
    data[:20, :20] = 0
    profile = dict(driver="GTiff", width=400, height=300, count=1, dtype="uint8", crs="EPSG:32634",
                   transform=Affine(SIZE, 0, ORIGIN[0], 0, -SIZE, ORIGIN[1]), tiled=True, blockxsize=128,
                   blockysize=128, nodata=nodata)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
        if mask:
            m = np.full((300, 400), 255, dtype=np.uint8)
            m[HIDDEN] = 0
            dst.write_mask(m)
    return data


def _window(col: int, row: int, width: int, height: int) -> observe._Window:
    """A lattice window at the file's pixel (col, row): the lattice is the file's own grid."""
    c0, r0 = round(ORIGIN[0] / SIZE) + col, round(-ORIGIN[1] / SIZE) + row
    return observe._Window(CRS.from_epsg(32634), SIZE, (c0, r0, c0 + width, r0 + height), [])


def _both(path, w, monkeypatch):
    with rasterio.open(path) as src:
        fill = src.nodata if src.nodata is not None else 0
        fast = observe._read_window(src, w, fill)
        aligned = observe._aligned(src, w)
    with monkeypatch.context() as m:
        m.setattr(observe, "_aligned", lambda *_: None)
        with rasterio.open(path) as src:
            warped = observe._read_window(src, w, fill)
    return fast, warped, aligned


@pytest.mark.parametrize("cells", [(0, 0, 400, 300), (90, 80, 100, 100), (-25, -40, 200, 220)])
def test_a_file_with_an_internal_mask_reads_what_the_warper_reads(tmp_path, monkeypatch, cells):
    path = tmp_path / "scl_masked.tif"
    data = _write_scl(path, nodata=None, mask=True)
    col, row, width, height = cells
    fast, warped, aligned = _both(path, _window(col, row, width, height), monkeypatch)
    np.testing.assert_array_equal(fast, warped)
    assert aligned is None  # the mask is not the no-data value: the warper applies it
    hidden = fast[HIDDEN[0].start - row:HIDDEN[0].stop - row, HIDDEN[1].start - col:HIDDEN[1].stop - col]
    assert hidden.shape == (50, 50) and not hidden.any()  # hidden pixels are no data (0), not their class
    assert data[HIDDEN].all()  # (the file holds classes 1..11 there)


@pytest.mark.parametrize("cells", [(0, 0, 400, 300), (5, 5, 100, 100), (-25, -40, 160, 190)])
def test_a_file_with_a_nodata_value_keeps_the_plain_window_read_and_the_same_pixels(tmp_path, monkeypatch, cells):
    path = tmp_path / "scl_nodata.tif"
    data = _write_scl(path, nodata=0, mask=False)
    col, row, width, height = cells
    fast, warped, aligned = _both(path, _window(col, row, width, height), monkeypatch)
    assert aligned == (col, row)
    np.testing.assert_array_equal(fast, warped)
    r0, c0 = max(row, 0), max(col, 0)
    inside = data[r0:row + height, c0:col + width]
    np.testing.assert_array_equal(fast[r0 - row:r0 - row + inside.shape[0], c0 - col:c0 - col + inside.shape[1]],
                                  inside)


def _lattice_view_read(src, w: observe._Window, fill) -> np.ndarray:
    """The reference: one exact warped view of the file's whole extent on the window's lattice (plus a margin),
    the window cut out of it (what eo.observe read before it warped each window on its own)."""
    left, bottom, right, top = transform_bounds(src.crs, w.crs, *src.bounds, densify_pts=21)
    col0, row0 = math.floor(left / w.size) - 2, math.floor(-top / w.size) - 2
    col1, row1 = math.ceil(right / w.size) + 2, math.ceil(-bottom / w.size) + 2
    with WarpedVRT(src, crs=w.crs, transform=Affine(w.size, 0, col0 * w.size, 0, -w.size, -row0 * w.size),
                   width=col1 - col0, height=row1 - row0, resampling=Resampling.nearest, nodata=fill,
                   tolerance=observe.EXACT_TOLERANCE) as vrt:
        height, width = w.shape
        return observe._clipped_read(vrt, w.box[0] - col0, w.box[1] - row0, height, width, fill)


def _nearest_by_pyproj(data: np.ndarray, w: observe._Window) -> np.ndarray:
    """Each lattice pixel's centre taken to the file's CRS by pyproj, the file's pixel under it (0 off the file)."""
    height, width = w.shape
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    x, y = w.transform @ (cols, rows)
    sx, sy = Transformer.from_crs(w.crs, "EPSG:32634", always_xy=True).transform(x, y)
    c, r = np.floor((sx - ORIGIN[0]) / SIZE).astype(int), np.floor((ORIGIN[1] - sy) / SIZE).astype(int)
    inside = (c >= 0) & (c < data.shape[1]) & (r >= 0) & (r < data.shape[0])
    out = np.zeros((height, width), dtype=data.dtype)
    out[inside] = data[r[inside], c[inside]]
    return out


# Windows on the neighbouring zone's lattice (EPSG:32635, 20 m) over the file's west edge, its middle, its
# south-east corner and beyond it: each warped on its own equals the same cells of the whole-file view, and the
# file's pixel under each cell centre.
@pytest.mark.parametrize("offset", [(-30, 10, 120, 90), (150, 120, 60, 40), (380, 280, 70, 50), (600, 500, 20, 20)])
def test_a_window_on_another_zone_warped_alone_equals_the_whole_file_view(tmp_path, offset):
    path = tmp_path / "scl_nodata.tif"
    data = _write_scl(path, nodata=0, mask=False)
    crs = CRS.from_epsg(32635)
    with rasterio.open(path) as src:
        left, _, _, top = transform_bounds(src.crs, crs, *src.bounds)
        dc, dr, width, height = offset
        c0, r0 = math.floor(left / SIZE) + dc, math.floor(-top / SIZE) + dr
        w = observe._Window(crs, SIZE, (c0, r0, c0 + width, r0 + height), [])
        assert observe._aligned(src, w) is None
        alone, reference = observe._read_window(src, w, 0), _lattice_view_read(src, w, 0)
    np.testing.assert_array_equal(alone, reference)
    np.testing.assert_array_equal(alone, _nearest_by_pyproj(data, w))
