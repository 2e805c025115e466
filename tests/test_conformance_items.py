"""Conformance on real catalogue responses (tests/data/items/, provenance in SOURCES.md): every known
collection profile's items parse to the right acquisition, granule, tile, orbit, baseline, radiometry
rule and asset map, and versions of one granule collapse to the best one in PostGIS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.config import CatalogueSettings, get_settings
from core.db import session_scope
from core.models import Acquisition, Scene
from monitor.catalogues import ingest_items, parse_item, upsert_catalogue

ITEMS = Path(__file__).parent / "data" / "items"
PUBLIC = CatalogueSettings(
    name="public", url="https://stac.example", allowed_schemes=["https", "s3"],
    allowed_hosts=[
        "sentinel-cogs.s3.us-west-2.amazonaws.com",
        "e84-earth-search-sentinel-data.s3.us-west-2.amazonaws.com",
        "*.blob.core.windows.net", "usgs-landsat", "sentinel-s2-l2a",
    ],
)


def load(item_id: str) -> dict:
    return json.loads((ITEMS / f"{item_id}.json").read_text())


# item id: (profile, acquisition key, tile, relative orbit, baseline, red rule, offset in pixels, red/nir/mask keys)
EXPECTED = {
    "S2A_13TDE_20231008_0_L2A": (
        "earth-search-v1/sentinel-2-l2a", "sentinel-2a|2023-10-08T17:52:31Z", "13TDE", 141, "05.09",
        "flag-offset-removed", False, ("red", "nir", "scl")),
    "S2B_24MVV_20250731_0_L2A": (
        "earth-search-v1/sentinel-2-l2a", "sentinel-2b|2025-07-31T13:02:49Z", "24MVV", 95, "05.11",
        "flag-offset-removed", False, ("red", "nir", "scl")),
    "S2B_T24MVV_20250731T130245_L2A": (
        "earth-search/sentinel-2-c1-l2a", "sentinel-2b|2025-07-31T13:02:49Z", "24MVV", 95, "05.11",
        "esa-baseline", True, ("red", "nir", "scl")),
    "S2A_MSIL2A_20190101T000001_R116_T60VUK_20201007T214652": (
        "planetary-computer/sentinel-2-l2a", "sentinel-2a|2019-01-01T00:00:01Z", "60VUK", 116, "02.12",
        "esa-baseline", False, ("B04", "B08", "SCL")),
    "S2A_MSIL2A_20190101T000001_R116_T59VPE_20201007T214658": (
        "planetary-computer/sentinel-2-l2a", "sentinel-2a|2019-01-01T00:00:01Z", "59VPE", 116, "02.12",
        "esa-baseline", False, ("B04", "B08", "SCL")),
    # Earth Search v0: every field under its legacy sentinel:* name.
    "S2A_33UWP_20220405_0_L2A": (
        "earth-search-v0/sentinel-s2-l2a-cogs", "sentinel-2a|2022-04-05T10:00:31Z", "33UWP", 122, "04.00",
        "flag-offset-removed", False, ("B04", "B08", "SCL")),
    "LC08_L2SP_033032_20231008_02_T1": (
        "earth-search/landsat-c2-l2", "landsat-8|033032|2023-10-08", "033032", None, None,
        "raster-bands", None, ("red", "nir08", "qa_pixel")),
    "LC09_L2SR_084082_20250722_02_T1": (
        "planetary-computer/landsat-c2-l2", "landsat-9|084082|2025-07-22", "084082", None, None,
        "raster-bands", None, ("red", "nir08", "qa_pixel")),
}


@pytest.mark.parametrize("item_id", sorted(EXPECTED))
def test_real_item_parses_to_the_declared_profile(item_id):
    profile, key, tile, orbit, baseline, rule, in_pixels, keys = EXPECTED[item_id]
    parsed = parse_item(load(item_id), PUBLIC)
    assert parsed.profile == profile
    assert parsed.acquisition_key == key
    assert parsed.granule_key == f"{key}|{tile}"
    assert (parsed.tile, parsed.relative_orbit, parsed.processing_baseline) == (tile, orbit, baseline)
    red = parsed.assets["red"]
    assert red["radiometry"]["rule"] == rule and red["radiometry"]["offset_in_pixels"] is in_pixels
    mask = "scl" if "scl" in parsed.assets else "qa_pixel"
    assert (red["asset_key"], parsed.assets["nir"]["asset_key"], parsed.assets[mask]["asset_key"]) == keys
    if rule == "raster-bands":  # Landsat C2 L2: 2.75e-5 x DN - 0.2
        assert (red["scale"], red["offset"]) == (2.75e-5, -0.2)
    else:
        assert 1400 * red["scale"] + red["offset"] == pytest.approx(0.04 if in_pixels else 0.14)


def test_v0_relative_hrefs_resolve_against_the_canonical_link():
    parsed = parse_item(load("S2A_33UWP_20220405_0_L2A"), PUBLIC)
    assert parsed.assets["red"]["href"] == ("https://sentinel-cogs.s3.us-west-2.amazonaws.com/sentinel-s2-l2a-cogs/"
                                            "33/U/WP/2022/4/S2A_33UWP_20220405_0_L2A/B04.tif")


def test_earth_search_v1_and_c1_are_versions_of_one_granule_and_c1_wins(db):
    v1, c1 = load("S2B_24MVV_20250731_0_L2A"), load("S2B_T24MVV_20250731T130245_L2A")
    neighbour = load("S2B_24MWV_20250731_0_L2A")
    for order in ([v1, c1, neighbour], [c1, v1, neighbour]):
        with session_scope(get_settings()) as session:
            session.execute(Scene.__table__.delete())
            cat = upsert_catalogue(session, PUBLIC)
            for item in order:
                ingest_items(session, PUBLIC, cat, item["collection"], [item])
        with session_scope(get_settings()) as session:
            rows = session.execute(select(Scene.item_id, Scene.profile, Scene.assets["red"]["radiometry"]["rule"])
                                   .order_by(Scene.tile)).all()
            acquisitions = session.execute(select(func.count()).select_from(Acquisition)).scalar_one()
        # One granule per tile; 24MVV holds the C1 version with C1's own rule (never v1's assets with C1's id).
        assert [tuple(r) for r in rows] == [
            ("S2B_T24MVV_20250731T130245_L2A", "earth-search/sentinel-2-c1-l2a", "esa-baseline"),
            ("S2B_24MWV_20250731_0_L2A", "earth-search-v1/sentinel-2-l2a", "flag-offset-removed"),
        ]
        assert acquisitions == 1  # both tiles are granules of datatake GS2B_20250731T130249


def test_planetary_computer_and_earth_search_copies_share_granule_keys():
    pc = parse_item(load("S2A_MSIL2A_20190101T000001_R116_T60VUK_20201007T214652"), PUBLIC)
    other_tile = parse_item(load("S2A_MSIL2A_20190101T000001_R116_T59VPE_20201007T214658"), PUBLIC)
    # Same datatake, two UTM zones (60 and 59): one acquisition, two granules.
    assert pc.acquisition_key == other_tile.acquisition_key and pc.granule_key != other_tile.granule_key
