"""workers.raster.Grid.aoi: windows inside or outside the area skip the rasteriser; every window must give
what rasterising gives (pixel centres inside, or touched for sub-pixel areas)."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import geometry_mask
from shapely.geometry import Polygon, box, mapping

from workers.raster import Grid

TRANSFORM = Affine(10, 0, 500_000, 0, -10, 5_001_000)
# A notched polygon (concave, a hole) covering most of a 100 x 100 px grid.
AREA = Polygon([(500_105, 5_000_095), (500_895, 5_000_095), (500_895, 5_000_905), (500_505, 5_000_905),
                (500_505, 5_000_505), (500_105, 5_000_505)],
               holes=[[(500_605, 5_000_205), (500_705, 5_000_205), (500_705, 5_000_305), (500_605, 5_000_305)]])


def rasterised(grid: Grid) -> np.ndarray:
    return geometry_mask([mapping(grid.geom)], out_shape=(grid.height, grid.width), transform=grid.transform,
                         invert=True, all_touched=grid.all_touched)


@pytest.mark.parametrize("all_touched", [False, True])
def test_every_window_matches_the_rasteriser(all_touched):
    grid = Grid(CRS.from_epsg(32634), TRANSFORM, 100, 100, 10.0, AREA, all_touched)
    inside = outside = 0
    for r0 in range(0, 100, 10):
        for c0 in range(0, 100, 10):
            for size in (3, 10, 25):
                window = grid.window(slice(r0, r0 + size), slice(c0, c0 + size))
                expected = rasterised(window)
                got = window.aoi()
                assert got.dtype == bool and np.array_equal(got, expected), (r0, c0, size)
                inside += bool(expected.all())
                outside += not expected.any()
    # Both shortcuts were taken (and agreed with the rasteriser) as well as the rasterised mixed windows.
    assert inside > 0 and outside > 0


def test_a_window_inside_the_hole_is_empty():
    grid = Grid(CRS.from_epsg(32634), TRANSFORM, 100, 100, 10.0, AREA)
    hole = grid.window(slice(71, 79), slice(61, 69))  # rows 71-78, cols 61-68: inside the hole
    assert box(*hole.bounds).within(Polygon(AREA.interiors[0]))
    assert not hole.aoi().any()
