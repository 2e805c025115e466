"""The poll's batched ingest (one set of statements per page) and its searches in threads, against real
PostGIS and the local STAC API: the outcome must be the one item-by-item upserts and one search after
another would give — same scenes, same versions, same observations, nothing lost on a failure.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime

from shapely.geometry import Point, box, shape
from shapely.ops import nearest_points
from sqlalchemy import func, select

from core.config import get_settings
from core.db import session_scope
from core.models import Acquisition, Observation, PollState, QuarantinedItem, Scene
from devtools import localstac
from monitor.catalogues import ingest_items, poll_all, upsert_catalogue
from monitor.catalogues.items import parse_item
from tests.fixtures_ingest import loopback_catalogue

CAT = loopback_catalogue("http://127.0.0.1:9", ["sentinel-2-l2a"])
NOW = datetime(2020, 12, 31, tzinfo=UTC)


def absolute(item: dict) -> dict:
    return localstac.rewrite_asset_hrefs(item, "http://127.0.0.1:9")


def scenes() -> list[Scene]:
    with session_scope(get_settings()) as session:
        return list(session.execute(select(Scene).order_by(Scene.granule_key)).scalars())


def ingest(items: list[dict]):
    with session_scope(get_settings()) as session:
        return ingest_items(session, CAT, upsert_catalogue(session, CAT), "sentinel-2-l2a", items)


def twins(items_by_date, sample_data_dir) -> tuple[dict, dict]:
    v0 = absolute(items_by_date["2020-08-29"])
    v1 = absolute(json.loads((sample_data_dir / "fixtures" / "S2B_34TER_20200829_1_L2A.json").read_text()))
    return v0, v1


def test_twins_in_one_page_end_as_item_by_item_upserts_would(db, items_by_date, sample_data_dir):
    v0, v1 = twins(items_by_date, sample_data_dir)
    stats = ingest([v0, v1])  # one page holding the granule twice: the better one second
    assert (stats.items_seen, stats.new_scenes, stats.upgraded_scenes, stats.unchanged) == (2, 1, 1, 0)
    (scene,) = scenes()
    assert scene.item_id == v1["id"] and scene.versions_seen == 2

    stats = ingest([v1, v0])  # both again, the better one first: nothing to write
    assert (stats.new_scenes, stats.upgraded_scenes, stats.unchanged) == (0, 0, 2)
    (again,) = scenes()
    assert again.item_id == v1["id"] and again.versions_seen == 2 and again.updated_at == scene.updated_at
    assert len(stats.granule_keys) == 2  # unchanged granules still reach the observations


def test_a_row_the_database_refuses_is_quarantined_and_its_page_mates_stored(db, items_by_date):
    good = [absolute(items_by_date[d]) for d in ("2020-07-30", "2020-08-04")]
    bad = absolute(items_by_date["2020-08-29"])
    bad["properties"]["sat:relative_orbit"] = 2**40  # parses, but PostgreSQL integers stop at 2**31 - 1
    stats = ingest([good[0], bad, good[1]])
    assert (stats.items_seen, stats.new_scenes, stats.quarantined) == (3, 2, 1)
    assert sorted(s.item_id for s in scenes()) == sorted(g["id"] for g in good)
    with session_scope(get_settings()) as session:
        (reason,) = session.execute(select(QuarantinedItem.reason).where(QuarantinedItem.item_id == bad["id"])).one()
        assert reason.startswith("database refused the item") and "out of range" in reason
        assert session.execute(select(func.count()).select_from(Acquisition)).scalar_one() == 2


def test_a_later_granule_fills_in_the_acquisition_orbit(db, items_by_date):
    first = absolute(items_by_date["2020-08-29"])
    parsed = parse_item(first, CAT)
    anonymous = copy.deepcopy(first)  # the same datatake and tile, no orbit anywhere in the item
    anonymous["id"] = "S2B_34TER_20200829_no_orbit"
    del anonymous["properties"]["s2:product_uri"]  # ..._R136_...: where the orbit is read from
    anonymous["properties"]["s2:datatake_id"] = f"GS2B_{parsed.datatake_at:%Y%m%dT%H%M%S}_000000_N05.00"
    assert parse_item(anonymous, CAT).relative_orbit is None
    assert parse_item(anonymous, CAT).acquisition_key == parsed.acquisition_key and parsed.relative_orbit == 136
    ingest([anonymous])
    ingest([first])
    with session_scope(get_settings()) as session:
        orbits = session.execute(select(Acquisition.relative_orbit)).scalars().all()
    assert orbits == [parsed.relative_orbit]


def corner_areas(footprint, add_area) -> dict[int, object]:
    """Four ~80 m areas in the corners of the sample footprint (~1 km wide), ~700 m apart: with a group
    distance of 100 m, four groups and four searches."""
    minx, miny, maxx, maxy = footprint.bounds
    inner = footprint.buffer(-0.0015)
    areas = {}
    for x, y in ((minx, miny), (maxx, miny), (minx, maxy), (maxx, maxy)):
        _, nearest = nearest_points(Point(x, y), inner)
        geom = box(nearest.x - 0.0005, nearest.y - 0.0005, nearest.x + 0.0005, nearest.y + 0.0005)
        areas[add_area(f"corner {len(areas)}", geom, max_cloud_cover=100.0)] = geom
    return areas


def expected_pairs(sample_items, areas) -> set[tuple[int, str]]:
    """(area, acquisition key) for every sample item whose footprint meets the area (shapely, not PostGIS)."""
    return {(area_id, parse_item(absolute(item), CAT).acquisition_key)
            for item in sample_items for area_id, geom in areas.items() if shape(item["geometry"]).intersects(geom)}


def stored_pairs() -> set[tuple[int, str]]:
    with session_scope(get_settings()) as session:
        rows = session.execute(select(Observation.area_id, Acquisition.key)
                               .join(Acquisition, Acquisition.id == Observation.acquisition_id)).all()
    return {tuple(r) for r in rows}


def threaded(cfg, threads: int):
    return cfg.model_copy(update={"poll": cfg.poll.model_copy(update={"search_threads": threads})})


def test_searches_in_threads_store_every_scene_and_observation(stac_api, make_settings, add_area, sample_items,
                                                               sample_footprint):
    cfg = threaded(make_settings(stac_api.url, ["sentinel-2-l2a"], page_size=3, lookback_days=3000,
                                 group_distance_km=0.1), 4)
    areas = corner_areas(sample_footprint, add_area)
    result = poll_all(cfg, now=NOW)
    poll = result.polls[0]
    assert result.ok, poll.error
    assert poll.groups == 4 and result.search_requests >= 4 * 6  # 16 items in pages of 3, per group
    assert poll.stats.items_seen == 4 * 16 and poll.stats.new_scenes == 16 and len(scenes()) == 16
    pairs = expected_pairs(sample_items, areas)
    assert stored_pairs() == pairs and result.observations_created == len(pairs)
    with session_scope(get_settings()) as session:
        assert session.execute(select(PollState.cursor)).scalar_one() == NOW


def test_a_failed_search_among_threads_keeps_the_cursor_and_the_next_poll_stores_everything(
        stac_api, make_settings, add_area, fault_proxy, sample_items, sample_footprint):
    cfg = threaded(make_settings(fault_proxy.url, ["sentinel-2-l2a"], page_size=3, lookback_days=3000,
                                 group_distance_km=0.1), 4)
    areas = corner_areas(sample_footprint, add_area)
    fault_proxy.fail("pass", "pass", 500)  # one of the concurrent searches' pages: 500 is not retried
    failed = poll_all(cfg, now=NOW)
    assert not failed.ok and "500" in failed.polls[0].error
    assert failed.total("items_seen") < 4 * 16 and len(scenes()) == failed.total("new_scenes")
    with session_scope(get_settings()) as session:
        state = session.execute(select(PollState)).scalar_one()
        assert state.cursor is None and "500" in state.last_error

    again = poll_all(cfg, now=NOW)
    assert again.ok, again.polls[0].error
    assert len(scenes()) == 16 and stored_pairs() == expected_pairs(sample_items, areas)
    with session_scope(get_settings()) as session:
        assert session.execute(select(PollState.cursor)).scalar_one() == NOW
