"""Antimeridian: item footprints and area searches near ±180° match only what lies on their own side.

Fiji straddles 180°. Three kinds of geometry meet there: an item footprint written as one ring that jumps
from 179.8 to −179.6 (read planarly: a polygon 359.4° wide), an item already split into a MultiPolygon
(RFC 7946 §3.1.9), and watched areas that the areas parser splits at 180°. An item over Fiji must not
match an area in Africa at the same latitude, and an area over Fiji must not be searched as a band round
the world, whatever its vertex count (search geometries above 64 vertices are simplified).
"""

from __future__ import annotations

import copy
import itertools
import json
from datetime import UTC, datetime, timedelta

import pytest
import shapely
from shapely.geometry import MultiPolygon, Point, box, mapping, shape
from sqlalchemy import select

from core.config import get_settings
from core.db import session_scope
from core.models import Observation, Scene
from devtools import localstac
from monitor.catalogues import create_observations, ingest_items, parse_item, poll_all, upsert_catalogue
from monitor.catalogues.groups import MAX_SEARCH_VERTICES, AreaFootprint, group_areas, search_geometry
from monitor.geometry import parse_areas, rfc7946_geometry, to_feature
from tests.fixtures_ingest import loopback_catalogue

CAT = loopback_catalogue("http://127.0.0.1:9", ["sentinel-2-l2a"])
NOW = datetime(2024, 6, 20, 12, tzinfo=UTC)

# The ring of the issue: 179.8 -> -179.6 across the antimeridian, latitudes -17 .. -16 (Fiji).
CROSSING_RING = {"type": "Polygon", "coordinates": [[[179.8, -17.0], [-179.6, -17.0], [-179.6, -16.0],
                                                     [179.8, -16.0], [179.8, -17.0]]]}
SPLIT_MULTIPOLYGON = {"type": "MultiPolygon", "coordinates": [
    [[[179.8, -17.0], [180.0, -17.0], [180.0, -16.0], [179.8, -16.0], [179.8, -17.0]]],
    [[[-180.0, -17.0], [-179.6, -17.0], [-179.6, -16.0], [-180.0, -16.0], [-180.0, -17.0]]],
]}


def tile_item(template: dict, tile: str, when: datetime, geometry: dict) -> dict:
    """An Earth Search v1 shaped item of ``tile`` sensed at ``when`` with ``geometry`` as its footprint."""
    item = localstac.rewrite_asset_hrefs(copy.deepcopy(template), "http://127.0.0.1:9")
    stamp = when.strftime("%Y%m%dT%H%M%S")
    item["id"] = f"S2A_{tile}_{when:%Y%m%d}_0_L2A"
    item["geometry"] = geometry
    item["bbox"] = list(shape(geometry).bounds)
    props = item["properties"]
    props.update({
        "datetime": when.strftime("%Y-%m-%dT%H:%M:%S.000000Z"), "grid:code": f"MGRS-{tile}",
        "mgrs:utm_zone": int(tile[:2]), "mgrs:latitude_band": tile[2], "mgrs:grid_square": tile[3:],
        "s2:product_uri": f"S2A_MSIL2A_{stamp}_N0510_R072_T{tile}_{stamp}.SAFE",
        "s2:processing_baseline": "05.10", "earthsearch:boa_offset_applied": True,
        "s2:generation_time": when.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
    })
    return item


def circle(lon: float, lat: float, radius: float, vertices: int) -> shapely.Polygon:
    """A ``vertices``-gon round (lon, lat); may run past 180° (the areas parser wraps and splits it)."""
    return Point(lon, lat).buffer(radius, quad_segs=max(1, vertices // 4))


def area_wkt_across_180(vertices: int) -> str:
    """An area over Fiji written with longitudes running past 180 (as QGIS exports in EPSG:3832)."""
    return circle(180.0, -16.5, 0.3, vertices).wkt


def observed_areas(names: dict[int, str]) -> set[str]:
    with session_scope(get_settings()) as session:
        return {names[a] for a in session.execute(select(Observation.area_id)).scalars()}


# --- item footprints -------------------------------------------------------------------------------


def test_a_footprint_ring_jumping_across_180_is_split_not_359_degrees_wide(sample_items):
    parsed = parse_item(tile_item(sample_items[0], "60KWE", NOW, CROSSING_RING), CAT)
    footprint = parsed.footprint
    assert footprint.geom_type == "MultiPolygon" and len(footprint.geoms) == 2
    east, west = sorted(footprint.geoms, key=lambda p: -p.bounds[0])
    assert east.bounds == pytest.approx((179.8, -17.0, 180.0, -16.0))
    assert west.bounds == pytest.approx((-180.0, -17.0, -179.6, -16.0))
    # 0.2 + 0.4 degrees of longitude by 1 of latitude, not 359.4 x 1.
    assert footprint.area == pytest.approx(0.6)
    assert not footprint.intersects(Point(25.0, -16.5))


def test_an_already_split_multipolygon_footprint_is_kept(sample_items):
    parsed = parse_item(tile_item(sample_items[0], "60KWE", NOW, SPLIT_MULTIPOLYGON), CAT)
    assert parsed.footprint.equals(shape(SPLIT_MULTIPOLYGON))
    assert parsed.footprint.area == pytest.approx(0.6)


@pytest.mark.parametrize("geometry", [CROSSING_RING, SPLIT_MULTIPOLYGON], ids=["ring-crossing", "multipolygon"])
def test_an_item_over_fiji_is_observed_by_areas_on_both_sides_and_not_by_africa(db, add_area, sample_items,
                                                                               geometry):
    names = {
        add_area("fiji-east", box(179.85, -16.6, 179.95, -16.5)): "fiji-east",
        add_area("fiji-west", box(-179.8, -16.6, -179.7, -16.5)): "fiji-west",
        add_area("zambia", box(25.0, -16.6, 25.1, -16.5)): "zambia",  # same latitudes, far side of the world
    }
    with session_scope(get_settings()) as session:
        catalogue_id = upsert_catalogue(session, CAT)
        stats = ingest_items(session, CAT, catalogue_id, "sentinel-2-l2a",
                             [tile_item(sample_items[0], "60KWE", NOW, geometry)])
        scene_ids = list(session.execute(select(Scene.id)).scalars())
        created = create_observations(session, list(names), scene_ids)
    assert stats.new_scenes == 1 and created == 2
    assert observed_areas(names) == {"fiji-east", "fiji-west"}


# --- areas and their searches ------------------------------------------------------------------------


@pytest.mark.parametrize("vertices", [16, 48, 200, 2000])
def test_search_geometry_of_an_antimeridian_area_stays_on_its_two_sides(vertices):
    (area,) = parse_areas(area_wkt_across_180(vertices), max_vertices=100_000)
    assert len(area.geometry.geoms) == 2  # the parser split it at 180
    search = search_geometry([area.geometry])
    assert shapely.get_num_coordinates(search) <= MAX_SEARCH_VERTICES
    parts = list(search.geoms) if search.geom_type == "MultiPolygon" else [search]
    assert len(parts) == 2
    for part in parts:
        minx, _, maxx, _ = part.bounds
        assert maxx - minx < 0.31  # each side is at most the 0.3° radius wide, not 360°
    assert search.buffer(1e-9).covers(area.geometry)
    for lon in (0.0, 25.0, 90.0, -90.0):
        assert not search.intersects(Point(lon, -16.5))


def test_an_antimeridian_area_is_not_grouped_with_the_areas_of_its_latitudes():
    (fiji,) = parse_areas(area_wkt_across_180(200), max_vertices=100_000)
    areas = [AreaFootprint(1, fiji.geometry, 50), AreaFootprint(2, box(25.0, -16.6, 25.1, -16.5), 50),
             AreaFootprint(3, box(179.5, -16.6, 179.6, -16.5), 50)]
    groups = group_areas(areas, distance_km=50)
    by_member = {a: g for g in groups for a in g.area_ids}
    assert by_member[1].area_ids == [1]
    assert not by_member[1].geometry.intersects(Point(25.05, -16.55))
    assert not by_member[2].geometry.intersects(Point(179.9, -16.5))


@pytest.mark.parametrize("vertices", [16, 200], ids=["below-64-vertices", "above-64-vertices"])
def test_polling_an_antimeridian_area_finds_the_items_of_both_sides_only(stac_collection, make_settings,
                                                                       add_area, sample_items, vertices):
    template = sample_items[0]
    when = NOW - timedelta(days=2)
    published = {
        "east": tile_item(template, "60KXE", when, mapping(box(179.5, -17.0, 180.0, -16.0))),
        "west": tile_item(template, "01KAU", when, mapping(box(-180.0, -17.0, -179.5, -16.0))),
        "zambia": tile_item(template, "35KKV", when, mapping(box(24.5, -17.0, 25.5, -16.0))),
        "equator": tile_item(template, "60NXA", when, mapping(box(179.5, 0.0, 180.0, 1.0))),
    }
    for item in published.values():
        stac_collection.publish(item)
    (fiji,) = parse_areas(area_wkt_across_180(vertices), max_vertices=100_000)
    add_area("fiji", fiji.geometry, collections=[stac_collection.id])
    cfg = make_settings(stac_collection.api.url, [stac_collection.id])

    result = poll_all(cfg, now=NOW)

    assert result.ok and result.search_requests == 1
    with session_scope(get_settings()) as session:
        stored = set(session.execute(select(Scene.item_id)).scalars())
    assert stored == {published["east"]["id"], published["west"]["id"]}
    assert result.observations_created == 1  # both tiles are granules of one acquisition: one observation


# --- GeoJSON output ----------------------------------------------------------------------------------


def test_geojson_of_an_antimeridian_area_is_split_at_180_per_rfc_7946():
    (area,) = parse_areas(area_wkt_across_180(200), max_vertices=100_000)
    feature = to_feature(area.geometry, {"name": "fiji"}, feature_id=7)
    geometry = feature["geometry"]
    assert geometry["type"] == "MultiPolygon" and len(geometry["coordinates"]) == 2
    sides = []
    for polygon in geometry["coordinates"]:
        ring = polygon[0]
        lons = [lon for lon, _ in ring]
        # Each part lies on one side and touches 180 / -180 exactly; no edge jumps across the world.
        assert all(abs(b - a) < 180 for a, b in itertools.pairwise(lons))
        sides.append(("east", max(lons)) if min(lons) >= 0 else ("west", min(lons), max(lons) <= 0))
        assert all(-180 <= lon <= 180 for lon in lons)
        assert shapely.is_ccw(shapely.LinearRing(ring))  # RFC 7946 §3.1.6: exterior rings counter-clockwise
    assert sorted(sides) == [("east", 180.0), ("west", -180.0, True)]  # one part each side, both at the line
    assert shape(geometry).area == pytest.approx(area.geometry.area, rel=1e-6)
    assert json.loads(json.dumps(rfc7946_geometry(area.geometry)))["type"] == "MultiPolygon"


def test_a_footprint_ring_written_clockwise_is_split_the_same(sample_items):
    clockwise = {"type": "Polygon", "coordinates": [list(reversed(CROSSING_RING["coordinates"][0]))]}
    parsed = parse_item(tile_item(sample_items[0], "60KWE", NOW, clockwise), CAT)
    assert isinstance(parsed.footprint, MultiPolygon) and parsed.footprint.area == pytest.approx(0.6)
