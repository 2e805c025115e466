"""workers.spectral.SpectralAccumulator keeps the MAX_REGIONS largest regions while it goes.

Whole fragments ranked below MAX_REGIONS others are dropped block by block (and later ones no larger are
never vectorised); the regions kept, their order and the dropped count must be those of ranking every
region at the end: the largest first, ties by their first pixel in raster order of the whole grid — so
the same whatever the block layout.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from shapely.geometry import box

from workers.raster import Block, BlockPair, Chip, Grid, Survey
from workers.spectral import MAX_REGIONS, PairFacts, SpectralAccumulator

CRS_UTM = CRS.from_epsg(32634)
SIDE = 400  # px per block side; blocks sit side by side in one row
PITCH = 10  # one square per 10 x 10 px cell: squares never touch, 40 x 40 cells per block


def grid(blocks: int) -> Grid:
    transform = Affine(10, 0, 500_000, 0, -10, 5_000_000)
    geom = box(500_000, 5_000_000 - SIDE * 10, 500_000 + blocks * SIDE * 10, 5_000_000)
    return Grid(CRS_UTM, transform, blocks * SIDE, SIDE, 10.0, geom)


def block_with(g: Grid, k: int, sides: list[int]) -> BlockPair:
    """Block ``k`` with one vegetation-loss square of side ``sides[i]`` px in cell i (row by row)."""
    lost = np.zeros((SIDE, SIDE), bool)
    for i, side in enumerate(sides):
        r, c = (i // (SIDE // PITCH)) * PITCH + 1, (i % (SIDE // PITCH)) * PITCH + 1
        lost[r:r + side, c:c + side] = True
    shape = (SIDE, SIDE)
    before = {"red": np.full(shape, 0.05, np.float32), "nir": np.full(shape, 0.40, np.float32),
              "green": np.full(shape, 0.08, np.float32)}
    after = {b: a.copy() for b, a in before.items()}
    after["nir"][lost] = 0.10
    after["red"][lost] = 0.10  # NDVI 0.78 -> 0: vegetation loss
    rows, cols = slice(0, SIDE), slice(k * SIDE, (k + 1) * SIDE)
    ones = np.ones(shape, bool)
    return BlockPair(block=Block(rows, cols), grid=g.window(rows, cols), aoi=ones, before=before, after=after,
                     valid=ones, clear_after=ones)


def joined(g: Grid, parts: list[BlockPair], cols: slice) -> BlockPair:
    """The blocks ``parts`` (side by side) as one block over ``cols``."""
    cat = lambda arrays: np.concatenate(arrays, axis=1)  # noqa: E731
    rows = slice(0, SIDE)
    return BlockPair(block=Block(rows, cols), grid=g.window(rows, cols), aoi=cat([p.aoi for p in parts]),
                     before={b: cat([p.before[b] for p in parts]) for b in parts[0].before},
                     after={b: cat([p.after[b] for p in parts]) for b in parts[0].after},
                     valid=cat([p.valid for p in parts]), clear_after=cat([p.clear_after for p in parts]))


def run(sides_per_block: list[list[int]], one_block: bool = False):
    g = grid(len(sides_per_block))
    n = len(sides_per_block)
    blocks = [Block(slice(0, SIDE), slice(0, n * SIDE))] if one_block else \
        [Block(slice(0, SIDE), slice(k * SIDE, (k + 1) * SIDE)) for k in range(n)]
    survey = Survey(aoi_pixels=g.width * g.height, rows=(0, g.height), cols=(0, g.width),
                    chips=[Chip(k, 0, k * SIDE, SIDE, SIDE) for k in range(n)], blocks=blocks)
    acc = SpectralAccumulator(g, survey, min_mapping_unit_ha=0.1)
    parts = [block_with(g, k, sides) for k, sides in enumerate(sides_per_block)]
    for part in [joined(g, parts, blocks[0].cols)] if one_block else parts:
        acc.add(part)
    whole_held = len(acc.whole)
    result = acc.finish(PairFacts(grid=g, survey=survey, valid_fraction=1.0, notes=[],
                                  acquired=(datetime(2020, 7, 1), datetime(2020, 8, 1))))
    return result, whole_held


def test_the_largest_regions_are_kept_ties_by_first_pixel():
    # Block 0: 300 squares of 4 px a side (16 px), then 100 of 5 (25 px); block 1: 200 of 6 (36 px), then
    # 100 of 4 (16 px); block 2: 300 of 4 (16 px). Cells are 40 a row per block, blocks side by side.
    blocks = [[4] * 300 + [5] * 100, [6] * 200 + [4] * 100, [4] * 300]
    result, whole_held = run(blocks)
    assert MAX_REGIONS == 500
    assert len(result.regions) == 500
    sizes = [r.pixels for r in result.regions]
    # 200 x 36 px, 100 x 25 px, then the first 200 squares of 16 px in raster order of the whole grid:
    # cell rows 0-1 of blocks 0 and 2, then row 2 of block 0 (block 1's 16 px squares start in row 5).
    assert sizes == [36] * 200 + [25] * 100 + [16] * 200
    sixteen = [r for r in result.regions if r.pixels == 16]
    corners = [(round(5_000_000 - r.geom_utm.bounds[3]) // 10, round(r.geom_utm.bounds[0] - 500_000) // 10)
               for r in sixteen]
    expected = sorted((row * PITCH + 1, k * SIDE + col * PITCH + 1) for k in (0, 2) for row in range(5)
                      for col in range(SIDE // PITCH))[:200]
    assert corners == expected  # in rank order: raster order of their first (north-west) pixel
    assert result.regions_dropped == 1000 - 500
    assert result.metrics["vegetation_loss_ha"] == round((200 * 36 + 100 * 25 + 200 * 16) * 0.01, 4)
    assert whole_held == 500  # the geometries of the others were freed as the blocks went


def test_fewer_than_the_cap_are_all_kept():
    result, _ = run([[4] * 30 + [5] * 10, [3] * 7])  # 3 x 3 = 9 px: below the 0.1 ha mapping unit
    assert [r.pixels for r in result.regions] == [25] * 10 + [16] * 30
    assert result.regions_dropped == 7


def test_the_same_regions_whatever_the_blocks():
    # Ties at the cap: 800 squares of 16 px for the last 200 places, in three blocks or in one.
    blocks = [[4] * 300 + [5] * 100, [6] * 200 + [4] * 200, [4] * 300]
    three, _ = run(blocks)
    one, _ = run(blocks, one_block=True)
    assert [(r.pixels, r.fragment.first_pixel) for r in three.regions] == \
           [(r.pixels, r.fragment.first_pixel) for r in one.regions]
    assert all(a.geom_utm.equals(b.geom_utm) for a, b in zip(three.regions, one.regions, strict=True))
    assert (three.regions_dropped, three.metrics, three.classes) == (one.regions_dropped, one.metrics, one.classes)
    assert [vars(c) for c in three.chip_scores] == [vars(c) for c in one.chip_scores]
