"""Observations of an acquisition as a mosaic of its granules (eo/observe.py), on hand-made COGs over HTTP.

The zone-boundary case of the issue: an area across 24°E (UTM 34 | 35) under a clear sky, imaged by two
granules of one datatake, one in EPSG:32634 ending just east of 24°E and one in EPSG:32635 starting just
west of it. Reading one granule alone used to give "AOI clear fraction 50 %"; the mosaic sees all of it,
and a granule alone sees about half of it *imaged* and all of that clear.
"""

from __future__ import annotations

import pytest
from shapely.geometry import box

from devtools import localstac
from eo.observe import GranuleMask, NoCloudMask, observe_acquisition
from tests.fixtures_workers import loopback_catalogue
from tests.handmade import utm_box, write_granule

AREA = box(23.99, 45.0, 24.01, 45.01)  # straddles the 24°E zone boundary, about half on each side
SHARE: dict[str, float] = {}  # granule name -> share of AREA inside its footprint


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("handmade-observe")
    west = utm_box(32634, 23.95, 44.98, 24.0, 45.03)  # zone 34 granule, east edge at 24°E
    east = utm_box(32635, 24.0, 44.98, 24.05, 45.03)  # zone 35 granule, west edge at 24°E
    for name, epsg, bounds, scl in (("west-clear", 32634, west, 4), ("east-clear", 32635, east, 4),
                                    ("east-cloud", 32635, east, 9), ("west-group", 32634, west, 4),
                                    ("east-group", 32635, east, 4)):
        granule = write_granule(root, name, epsg, bounds, red=400, nir=3200, scl=scl)
        # A UTM box of one zone is not a lon/lat box: the west granule reaches a little past 24°E.
        SHARE[name] = AREA.intersection(granule.footprint_4326()).area / AREA.area
    with localstac.CogServer(root) as cogs:
        yield cogs


def _granule(server, name: str) -> GranuleMask:
    catalogue = loopback_catalogue(server.url)
    return GranuleMask(name, {"scl": {"href": server.href(f"{name}/scl.tif"), "nodata": 0}}, catalogue)


def test_mosaic_of_two_zones_sees_the_whole_area_clear(server):
    cov = observe_acquisition([_granule(server, "west-clear"), _granule(server, "east-clear")], {1: AREA})[1]
    assert cov.covered_fraction == pytest.approx(1.0, abs=0.02)
    assert cov.clear_fraction == pytest.approx(1.0)
    assert cov.granules_used == ("west-clear", "east-clear")


def test_one_granule_alone_is_partly_imaged_not_cloudy(server):
    cov = observe_acquisition([_granule(server, "west-clear")], {1: AREA})[1]
    assert 0.5 < SHARE["west-clear"] < 0.6
    assert cov.covered_fraction == pytest.approx(SHARE["west-clear"], abs=0.02)  # about half imaged …
    assert cov.clear_fraction == pytest.approx(1.0)  # … and all of what was imaged is clear


def test_cloud_in_one_granule_counts_against_the_imaged_part_only(server):
    cov = observe_acquisition([_granule(server, "west-clear"), _granule(server, "east-cloud")], {1: AREA})[1]
    assert cov.covered_fraction == pytest.approx(1.0, abs=0.02)
    # The first granule decides the overlap: clear where the west granule imaged, cloud beyond it.
    assert cov.clear_fraction == pytest.approx(SHARE["west-clear"], abs=0.02)


def test_one_read_per_granule_serves_a_group_of_areas(server):
    server.reset_stats()  # files not read before in this process: GDAL's cache cannot hide a request
    areas = {1: AREA, 2: box(23.96, 45.0, 23.97, 45.005), 3: box(24.03, 45.02, 24.04, 45.025),
             4: box(30, 45, 30.01, 45.01)}
    got = observe_acquisition([_granule(server, "west-group"), _granule(server, "east-group")], areas)
    assert got[1].covered_fraction == pytest.approx(1.0, abs=0.02)
    assert got[2].covered_fraction == pytest.approx(1.0) and got[3].covered_fraction == pytest.approx(1.0)
    assert got[4].covered_fraction == 0.0 and got[4].clear_fraction is None  # nothing imaged: no fraction
    paths = server.stats()["paths"]
    assert set(paths) == {"/west-group/scl.tif", "/east-group/scl.tif"}


def test_a_granule_without_a_mask_is_refused(server):
    bare = GranuleMask("bare", {"red": {"href": server.href("west-clear/red.tif")}}, loopback_catalogue(server.url))
    with pytest.raises(NoCloudMask):
        observe_acquisition([bare], {1: AREA})
