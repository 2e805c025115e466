"""Radiometry per collection, end to end on hand-made COGs read over loopback HTTP: item → ingest rule →
scene row → worker raster prep (real range reads, real PostGIS) → spectral result and recorded rule.

The issue's case: an unchanged surface (red DN 400, NIR 3200) on two dates, one at baseline 03.01, the
other at 05.10 on Earth Search v1 with ``earthsearch:boa_offset_applied: true``. Reflectance is DN/10000
on both, so NDVI = (0.32 − 0.04) / (0.32 + 0.04) = 0.7778 on both dates and nothing changed. Before
collection profiles, the 05.10 date lost another 1000 DN and showed a whole-area "vegetation gain".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape

from core.config import AnalysisSettings, Settings, get_settings
from core.db import session_scope
from devtools import localstac
from monitor.catalogues.items import parse_item
from monitor.catalogues.store import upsert_catalogue, upsert_scene
from tests.fixtures_workers import analysis_rows, insert_analysis, insert_area, loopback_catalogue
from tests.handmade import Granule, item_for, write_granule
from workers.pipeline import run_analysis

EPSG = 32634
GRANULE = (590_000.0, 5_000_000.0, 592_000.0, 5_002_000.0)
NDVI = round((3200 - 400) / (3200 + 400), 4)  # 0.7778


@pytest.fixture(scope="module")
def granules(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[localstac.CogServer, Path]]:
    root = tmp_path_factory.mktemp("handmade-radiometry")
    write_granule(root, "dark", EPSG, GRANULE, red=400, nir=3200)  # offset not (or no longer) in the pixels
    write_granule(root, "offset", EPSG, GRANULE, red=1400, nir=4200)  # the same surface with ESA's +1000 DN
    with localstac.CogServer(root) as server:
        yield server, root


@pytest.fixture
def world(db, granules):
    server, _ = granules
    catalogue = loopback_catalogue(server.url)
    settings = Settings(database_url=db, catalogues=[catalogue], analysis=AnalysisSettings(lease_seconds=60))
    meadow = shape(transform_geom(f"EPSG:{EPSG}", "EPSG:4326", mapping(box(590_500, 5_000_500, 591_500, 5_001_500))))
    area_id = insert_area(meadow, name="meadow")
    return {"server": server, "catalogue": catalogue, "settings": settings, "area": area_id}


def _scene(world, folder: str, **item_args) -> int:
    item = item_for(_granule(folder), world["server"].url, **item_args)
    with session_scope(get_settings()) as session:
        cat_id = upsert_catalogue(session, world["catalogue"])
        parsed = parse_item(item, world["catalogue"])
        scene_id, _ = upsert_scene(session, cat_id, item["collection"], parsed, item)
    return scene_id


def _granule(folder: str) -> Granule:
    return Granule(folder, EPSG, GRANULE, {b: f"{folder}/{b}.tif" for b in ("blue", "green", "red", "nir", "scl")})


def _run(world, after: int, before: int) -> dict:
    analysis_id = insert_analysis(world["area"], after, before)
    run_analysis(analysis_id, "test-worker", world["settings"])
    return analysis_rows([analysis_id])[analysis_id]


def _before(world, shape_name: str = "es-v1") -> int:
    return _scene(world, "dark", shape_name=shape_name, item_id=f"S2B_34TER_20210619_0_L2A-{shape_name}",
                  platform="sentinel-2b", tile="34TER", sensed="2021-06-19T09:35:05Z", baseline="03.01", flag=False)


def test_flagged_earth_search_v1_item_is_not_offset_twice(world):
    before = _before(world)
    after = _scene(world, "dark", shape_name="es-v1", item_id="S2B_34TER_20240619_0_L2A", platform="sentinel-2b",
                   tile="34TER", sensed="2024-06-19T09:35:05Z", baseline="05.10", flag=True)
    row = _run(world, after, before)
    assert row["status"] == "done", row["last_error"]
    metrics = row["stats"]["metrics"]
    assert metrics["mean_ndvi_before"] == pytest.approx(NDVI, abs=1e-4)
    assert metrics["mean_ndvi_after"] == pytest.approx(NDVI, abs=1e-4)
    assert metrics["changed_ha"] == 0.0 and metrics["vegetation_gain_ha"] == 0.0
    radiometry = row["stats"]["radiometry"]
    assert radiometry["after"]["rule"] == "flag-offset-removed"
    assert radiometry["after"]["profile"] == "earth-search-v1/sentinel-2-l2a"
    assert radiometry["before"]["rule"] == "esa-baseline" and radiometry["before"]["offset_in_pixels"] is False
    assert row["stats"]["harmonisation"]["after"].startswith("DN / 10000 (baseline 05.10, "
                                                              "earthsearch:boa_offset_applied=true")


@pytest.mark.parametrize("shape_name", ["es-c1", "pc"])
def test_collections_that_keep_the_esa_offset_subtract_it(world, shape_name):
    before = _before(world)
    after = _scene(world, "offset", shape_name=shape_name, item_id=f"S2B_T34TER_20240619T093505_L2A-{shape_name}",
                   platform="sentinel-2b", tile="34TER", sensed="2024-06-19T09:35:05Z", baseline="05.10")
    row = _run(world, after, before)
    assert row["status"] == "done", row["last_error"]
    metrics = row["stats"]["metrics"]
    assert metrics["mean_ndvi_after"] == pytest.approx(NDVI, abs=1e-4) and metrics["changed_ha"] == 0.0
    assert row["stats"]["radiometry"]["after"]["offset_in_pixels"] is True
    assert row["stats"]["harmonisation"]["after"].startswith("(DN - 1000) / 10000")


def test_wrong_flag_contradicted_by_the_pixels_fails_the_analysis(world):
    before = _before(world)
    # Earth Search v1 flag false at 05.10 (the #66/#71 kind), but the pixels have no offset in them.
    after = _scene(world, "dark", shape_name="es-v1", item_id="S2B_34TER_20240619_1_L2A", platform="sentinel-2b",
                   tile="34TER", sensed="2024-06-19T09:35:05Z", baseline="05.10", flag=False)
    row = _run(world, after, before)
    assert row["status"] == "failed"
    assert "radiometry of S2B_34TER_20240619_1_L2A contradicts its metadata: 100% of the clear red pixels are " \
           "below 1000 DN" in row["last_error"]
