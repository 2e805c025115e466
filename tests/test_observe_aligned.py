"""eo.observe reads a window on the mask file's own grid without the warper only when that gives the warper's
pixels: a file with an internal mask (pixels the mask hides are no-data to the warper) takes the warped view,
a file with only a no-data value keeps the plain window read, and both paths agree on either file."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

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
        vrts: dict = {}
        fast = observe._read_window(src, w, fill, vrts)
        aligned = observe._aligned(src, w)
        for vrt in vrts.values():
            vrt.close()
    with monkeypatch.context() as m:
        m.setattr(observe, "_aligned", lambda *_: None)
        with rasterio.open(path) as src:
            vrts = {}
            warped = observe._read_window(src, w, fill, vrts)
            for vrt in vrts.values():
                vrt.close()
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
