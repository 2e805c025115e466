"""workers.regions.block_fragments: labelled components, their statistics and the mapping-unit cut.

The fragments come from scipy's labels and one masked ``shapes`` pass; each is checked here against its
own polygon burnt back onto the block (``rasterize``), the way the statistics were computed before.
"""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from affine import Affine
from rasterio.features import rasterize
from scipy import ndimage

from workers.regions import block_fragments

TRANSFORM = Affine(10, 0, 500_000, 0, -10, 5_000_000)
ORIGIN = (30, 200, 1000)  # the block starts at row 30, column 200 of a 1000 px wide grid


def class_map(seed: int, shape=(120, 90)) -> np.ndarray:
    """Blobs of two classes with single pixels and corner-touching diagonals (self-touching rings)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    out = np.zeros(shape, np.uint8)
    out[noise > 0.15] = 3
    out[noise < -0.15] = 4
    out[rng.random(shape) < 0.01] = 1
    for k in range(8):  # a one-pixel diagonal road: one 8-connected region
        out[10 + k, 70 + k] = 2
    out[40, 40], out[41, 41], out[40, 41], out[41, 40] = 2, 2, 0, 0
    return out


def fragments(cm: np.ndarray, min_pixels: int, edges=(True, False, True, False)):
    rng = np.random.default_rng(1)
    d_ndvi = rng.normal(size=cm.shape).astype(np.float32)
    d_ndvi[rng.random(cm.shape) < 0.05] = np.nan
    bare = rng.random(cm.shape) < 0.3
    chip_local = np.full(cm.shape, -1, np.int64)
    chip_local[:60, :45], chip_local[60:, 45:] = 0, 1
    h, w = cm.shape
    sector = (np.arange(h)[:, None] * 3 // h) * 3 + np.arange(w)[None, :] * 3 // w
    before = {"ndvi": rng.normal(size=cm.shape).astype(np.float32), "ndbi": None}
    found = block_fragments(cm, d_ndvi, bare, chip_local, [7, 9], sector, TRANSFORM, edges, ORIGIN, before=before,
                            min_pixels=min_pixels)
    return found, d_ndvi, bare, chip_local, sector, before


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_fragment_is_its_polygons_pixels(seed):
    cm = class_map(seed)
    found, d_ndvi, bare, chip_local, sector, before = fragments(cm, min_pixels=0)
    assert found.dropped == 0 and found.count == len(found.fragments)
    assert sum(f.pixels for f in found.fragments) == int((cm > 0).sum())
    seen = np.zeros(cm.shape, bool)
    for f in found.fragments:
        assert f.geom.is_valid
        burnt = rasterize([(f.geom, 1)], out_shape=cm.shape, transform=TRANSFORM, fill=0, dtype="uint8") > 0
        assert not (burnt & seen).any()
        seen |= burnt
        assert (cm[burnt] == f.code).all()
        assert f.pixels == int(burnt.sum()) == round(f.geom.area / 100)
        d = d_ndvi[burnt]
        assert f.d_count == int(np.isfinite(d).sum())
        assert f.d_sum == pytest.approx(float(np.nansum(d.astype(np.float64))), abs=1e-9)
        assert f.bare == int(bare[burnt].sum())
        assert f.sectors.tolist() == np.bincount(sector[burnt], minlength=9).tolist()
        chips = np.bincount(np.clip(chip_local[burnt], 0, None), minlength=2)
        assert f.chips == {c: int(n) for c, n in zip((7, 9), chips, strict=True) if n}
        assert f.b_count == {"ndvi": int(np.isfinite(before["ndvi"][burnt]).sum()), "ndbi": 0}
        rows, cols = np.nonzero(burnt)
        assert f.border == bool(rows.min() == 0 or cols.min() == 0)  # top and left are inside edges
        # Its first pixel in raster order (np.nonzero's order), as a raster index of the whole grid.
        row0, col0, width = ORIGIN
        assert f.first_pixel == (row0 + int(rows[0])) * width + col0 + int(cols[0])
    assert (seen == (cm > 0)).all()
    diagonal = [f for f in found.fragments if f.code == 2 and f.pixels == 8]
    assert len(diagonal) == 1  # 8-connected: the diagonal road is one region


def test_small_whole_fragments_are_counted_not_vectorised():
    cm = class_map(3)
    every, *_ = fragments(cm, min_pixels=0)
    cut, *_ = fragments(cm, min_pixels=10)
    kept = [f for f in every.fragments if f.border or f.pixels >= 10]
    assert 0 < len(kept) < len(every.fragments)
    assert cut.count == every.count
    assert cut.dropped == len(every.fragments) - len(kept)
    assert [(f.code, f.pixels, f.border) for f in cut.fragments] == [(f.code, f.pixels, f.border) for f in kept]
    assert all(shapely.equals_exact(a.geom, b.geom, 0) for a, b in zip(cut.fragments, kept, strict=True))
    # A small fragment at an inside edge is kept: it may continue in the next block.
    assert any(f.border and f.pixels < 10 for f in cut.fragments)


def test_no_change_no_fragments():
    found, *_ = fragments(np.zeros((50, 50), np.uint8), min_pixels=10)
    assert (found.fragments, found.dropped, found.count) == ([], 0, 0)


def test_whole_fragments_ranked_after_the_floor_are_counted_not_vectorised():
    cm = class_map(4)
    every, *_ = fragments(cm, min_pixels=0)
    whole = sorted((f for f in every.fragments if not f.border), key=lambda f: (-f.pixels, f.first_pixel))
    last = whole[len(whole) // 2]  # the cap's last kept region, say
    found = block_fragments(*fragments_args(cm), floor=(last.pixels, last.first_pixel))
    expected = [f for f in every.fragments if f.border or (-f.pixels, f.first_pixel) < (-last.pixels, last.first_pixel)]
    assert any(f.pixels == last.pixels and f is not last for f in whole)  # a tie decided by the first pixel
    assert [(f.code, f.pixels, f.first_pixel) for f in found.fragments] == \
           [(f.code, f.pixels, f.first_pixel) for f in expected]
    assert found.dropped == len(every.fragments) - len(expected)


def fragments_args(cm: np.ndarray):
    rng = np.random.default_rng(1)
    d_ndvi = rng.normal(size=cm.shape).astype(np.float32)
    h, w = cm.shape
    sector = (np.arange(h)[:, None] * 3 // h) * 3 + np.arange(w)[None, :] * 3 // w
    return (cm, d_ndvi, np.zeros(cm.shape, bool), np.full(cm.shape, -1, np.int64), [], sector, TRANSFORM,
            (True, False, True, False), ORIGIN)
