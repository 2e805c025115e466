"""Polling and ingest: item parsing rules, grouping, and real polls of a local STAC API over HTTP.

The services (stac-fastapi-pgstac on pgstac, the COG server) are real subprocesses from
tests/fixtures_stac.py; each polling test publishes into its own empty collection. "Now" is passed
explicitly: the sample scenes are from 2015–2020, and the look-back window is relative to now.
"""

from __future__ import annotations

import json
import math
import random
import threading
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import box
from sqlalchemy import func, select

from core.config import CatalogueSettings, get_settings
from core.db import session_scope
from core.models import Analysis, Observation, PollState, QuarantinedItem, Scene
from devtools import localstac
from eo.questions import templates_version
from monitor.catalogues import ingest_items, parse_item, poll_all, upsert_catalogue
from monitor.catalogues.groups import MAX_EXTENT_FACTOR, AreaFootprint, group_areas, search_geometry
from monitor.catalogues.items import MalformedItem
from tests.fixtures_ingest import inner_aoi, loopback_catalogue


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def count(model) -> int:
    with session_scope(get_settings()) as session:
        return session.execute(select(func.count()).select_from(model)).scalar_one()


def scenes() -> list[Scene]:
    with session_scope(get_settings()) as session:
        return list(session.execute(select(Scene).order_by(Scene.acquired_at)).scalars())


def cursor_of(collection: str) -> PollState | None:
    with session_scope(get_settings()) as session:
        return session.execute(select(PollState).where(PollState.collection == collection)).scalar_one_or_none()


CAT = loopback_catalogue("http://127.0.0.1:9", ["sentinel-2-l2a"])


def absolute(item: dict) -> dict:
    """The committed items have hrefs relative to their file; a catalogue serves absolute URLs."""
    return localstac.rewrite_asset_hrefs(item, "http://127.0.0.1:9")


# --- item rules (no services) ----------------------------------------------------------------------


def test_parse_earth_search_item(items_by_date):
    parsed = parse_item(absolute(items_by_date["2020-08-29"]), CAT)
    # Acquisition = platform + datatake start (from the product id S2B_MSIL2A_20200829T092549_…, not the
    # tile's sensing time 09:35:05); the granule adds the tile.
    assert parsed.acquisition_key == "sentinel-2b|2020-08-29T09:25:49Z"
    assert parsed.granule_key == "sentinel-2b|2020-08-29T09:25:49Z|34TER"
    assert parsed.tile == "34TER"  # from grid:code MGRS-34TER
    assert parsed.relative_orbit == 136  # no sat:relative_orbit: parsed from s2:product_uri _R136_
    assert parsed.processing_baseline == "05.00"
    assert parsed.version_rank[0] == 5.0 and parsed.version_rank[2] == 0
    assert set(parsed.assets) >= {"red", "nir", "scl", "visual"}
    red = parsed.assets["red"]
    # baseline >= 04.00: reflectance = (DN - 1000) / 10000
    assert (red["scale"], red["offset"], red["nodata"]) == (0.0001, -0.1, 0)
    old = parse_item(absolute(items_by_date["2015-08-31"]), CAT)
    assert old.assets["red"]["offset"] == 0.0 and old.processing_baseline == "02.04"


def test_planetary_computer_and_landsat_shapes(items_by_date):
    item = absolute(items_by_date["2020-08-29"])
    props = item["properties"]
    item["id"] = "S2B_MSIL2A_20200829T092549_R136_T34TER_20230317T073500"
    for key in ("grid:code", "s2:product_uri", "s2:sequence", "s2:generation_time", "created", "updated"):
        props.pop(key)
    props["s2:mgrs_tile"] = "34TER"
    props["sat:relative_orbit"] = 136
    pc = parse_item(item, CAT)
    es = parse_item(absolute(items_by_date["2020-08-29"]), CAT)
    assert pc.acquisition_key == es.acquisition_key  # the same acquisition whichever catalogue served it
    assert pc.granule_key == es.granule_key
    assert pc.version_rank[1] == datetime(2023, 3, 17, 7, 35, tzinfo=UTC).timestamp()  # from the id

    landsat = absolute(items_by_date["2020-08-29"])
    landsat["id"] = "LC08_L2SP_186029_20200829_02_T1"
    lp = landsat["properties"]
    for key in list(lp):
        if key.startswith(("s2:", "grid:", "mgrs:")):
            lp.pop(key)
    lp.update({"platform": "landsat-8", "landsat:wrs_path": "186", "landsat:wrs_row": "029"})
    landsat["collection"] = "landsat-c2-l2"
    landsat["assets"]["qa_pixel"] = landsat["assets"].pop("scl")
    landsat["assets"]["nir08"] = landsat["assets"].pop("nir")
    for asset in ("red", "nir08"):
        landsat["assets"][asset]["raster:bands"][0].update(scale=2.75e-5, offset=-0.2)
    parsed = parse_item(landsat, CAT)
    assert parsed.tile == "186029" and parsed.relative_orbit is None
    assert parsed.profile == "earth-search/landsat-c2-l2"
    assert "qa_pixel" in parsed.assets and parsed.assets["nir"]["asset_key"] == "nir08"
    assert (parsed.assets["red"]["scale"], parsed.assets["red"]["offset"]) == (2.75e-5, -0.2)
    assert parsed.assets["red"]["radiometry"]["rule"] == "raster-bands"


def test_version_rank_orders_reprocessing(items_by_date, sample_data_dir):
    original = parse_item(absolute(items_by_date["2020-08-29"]), CAT)
    reprocessed = parse_item(
        absolute(json.loads((sample_data_dir / "fixtures" / "S2B_34TER_20200829_1_L2A.json").read_text())), CAT
    )
    assert reprocessed.granule_key == original.granule_key
    assert reprocessed.version_rank > original.version_rank


@pytest.mark.parametrize(
    ("fixture", "field"),
    [
        ("bad-no-geometry.json", "geometry"),
        ("bad-no-datetime.json", "datetime"),
        ("bad-no-usable-assets.json", "assets"),
        ("bad-json-types.json", "eo:cloud_cover"),
        ("bad-hostile-hrefs.json", "refused"),
    ],
)
def test_malformed_fixtures_are_refused_with_the_field_named(sample_data_dir, fixture, field):
    item = json.loads((sample_data_dir / "fixtures" / fixture).read_text())
    with pytest.raises(MalformedItem, match=field):
        parse_item(item, CAT)


def test_group_areas_merges_neighbours_and_splits_chains():
    # 3 clusters: two tiny areas 5 km apart, one alone 300 km away, and a 540 km straight chain of areas
    # every 18 km (linked one by one; its hull is a thin strip, so one search asks for no more items than
    # three would).
    areas = [AreaFootprint(1, box(22.0, 45.0, 22.01, 45.01), 50), AreaFootprint(2, box(22.06, 45.0, 22.07, 45.01), 80),
             AreaFootprint(3, box(26.0, 45.0, 26.01, 45.01), 20)]
    areas += [AreaFootprint(10 + i, box(10 + 0.25 * i, 50.0, 10.01 + 0.25 * i, 50.01), 50) for i in range(30)]
    groups = group_areas(areas, distance_km=50)
    by_member = {a: g for g in groups for a in g.area_ids}
    assert by_member[1] is by_member[2] and by_member[1].max_cloud_cover == 80
    assert by_member[3].area_ids == [3]
    assert {id(by_member[10 + i]) for i in range(30)} == {id(by_member[10])}
    assert len(groups) == 3


def test_group_areas_splits_wide_and_hollow_clusters():
    # An L of two 540 km legs: one hull would be a ~145,000 km² triangle of nothing. Split at least in two.
    leg = [box(10 + 0.25 * i, 50.0, 10.01 + 0.25 * i, 50.01) for i in range(30)]
    up = [box(10.0, 50.2 + 0.16 * i, 10.01, 50.21 + 0.16 * i) for i in range(30)]
    groups = group_areas([AreaFootprint(i, g, 50) for i, g in enumerate(leg + up)], distance_km=50)
    assert 2 <= len(groups) <= 4
    assert all(len(g.area_ids) >= 10 for g in groups)
    # A straight chain 1,400 km long: wider than MAX_EXTENT_FACTOR x 50 km, split into pieces at most that wide.
    chain = [AreaFootprint(i, box(-10 + 0.25 * i, 50.0, -9.99 + 0.25 * i, 50.01), 50) for i in range(80)]
    groups = group_areas(chain, distance_km=50)
    assert 2 <= len(groups) <= 4
    for group in groups:
        minx, _, maxx, _ = group.geometry.bounds
        assert (maxx - minx) * 111.32 * math.cos(math.radians(50)) <= MAX_EXTENT_FACTOR * 50


def test_a_dense_spread_of_areas_makes_few_searches():
    # 2,000 areas one every ~20 km over 6 x 4 degrees: one cluster, dense, ~450 x 440 km: one search.
    rng = random.Random(3)
    areas = [AreaFootprint(i, box(x, y, x + 0.01, y + 0.01), 50)
             for i, (x, y) in enumerate((rng.uniform(10, 16), rng.uniform(45, 49)) for _ in range(2000))]
    assert len(group_areas(areas, distance_km=50)) == 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-170, 170), st.floats(-70, 70), st.floats(0.001, 0.5)), min_size=1,
                max_size=25), st.sampled_from([0.0, 10.0, 50.0, 200.0]))
def test_every_search_geometry_contains_its_areas(boxes, distance):
    areas = [AreaFootprint(i, box(x, y, x + s, y + s), 50) for i, (x, y, s) in enumerate(boxes)]
    groups = group_areas(areas, distance)
    assert sorted(a for g in groups for a in g.area_ids) == list(range(len(areas)))
    for group in groups:
        assert len(group.geometry.exterior.coords) <= 65
        for area_id in group.area_ids:
            assert group.geometry.buffer(1e-9).contains(areas[area_id].geometry)


def test_search_geometry_of_a_complex_area_is_a_simple_superset():
    circle = box(0, 0, 1, 1).buffer(0.5, quad_segs=64)  # ~260 vertices
    simple = search_geometry([circle])
    assert len(simple.exterior.coords) <= 65 and simple.buffer(1e-9).contains(circle)


# --- polls against the local STAC API ---------------------------------------------------------------


def test_new_item_repoll_and_late_item(stac_collection, make_settings, add_area, items_by_date, sample_footprint):
    cfg = make_settings(stac_collection.api.url, [stac_collection.id], lookback_days=40)
    area_id = add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])

    stac_collection.publish(items_by_date["2020-08-04"])
    first = poll_all(cfg, now=utc("2020-08-05T12:00:00"))
    assert first.ok and first.total("new_scenes") == 1
    from monitor.pairing import process_pending

    paired = process_pending(cfg)
    assert paired.clear == 1 and paired.analyses_created == 0 and paired.no_before == 1
    with session_scope(get_settings()) as session:
        reason = session.execute(select(Observation.reason)).scalar_one()
    assert reason.startswith("no earlier clear acquisition of tile 34TER orbit R136")

    # A new acquisition is published: one new scene, one analysis (after 08-29, before 08-04).
    stac_collection.publish(items_by_date["2020-08-29"])
    second = poll_all(cfg, now=utc("2020-08-30T12:00:00"))
    assert second.total("items_seen") == 2 and second.total("new_scenes") == 1
    paired = process_pending(cfg)
    assert paired.analyses_created == 1
    with session_scope(get_settings()) as session:
        analysis = session.execute(select(Analysis)).scalar_one()
        assert analysis.area_id == area_id and analysis.status.value == "pending"
        assert (analysis.after_scene.item_id, analysis.before_scene.item_id) == (
            "S2B_34TER_20200829_0_L2A", "S2A_34TER_20200804_0_L2A")
        assert analysis.pair_reason == (
            "latest earlier clear acquisition of tile 34TER orbit R136: 2020-08-04 (clear 100%)")
        assert analysis.analyser == "spectral@1" and analysis.question_set == f"@{templates_version()}"
    assert cursor_of(stac_collection.id).cursor == utc("2020-08-30T12:00:00")

    # Re-poll: nothing new anywhere.
    again = poll_all(cfg, now=utc("2020-08-30T12:00:00"))
    assert again.total("items_seen") == 2 and again.total("new_scenes") == 0 and again.observations_created == 0
    assert process_pending(cfg).analyses_created == 0
    assert count(Analysis) == 1 and count(Scene) == 2

    # A late item: acquired 2020-07-30 (before the newest scene) but published only now; it is inside
    # cursor − look-back, so the next poll picks it up.
    stac_collection.publish(items_by_date["2020-07-30"])
    late = poll_all(cfg, now=utc("2020-08-31T12:00:00"))
    assert late.total("new_scenes") == 1
    assert scenes()[0].item_id == "S2B_34TER_20200730_0_L2A"
    # 41 % scene cloud cover, but the area itself is 81 % clear: it is observed as clear.
    paired = process_pending(cfg)
    assert paired.clear == 1


def test_reprocessed_duplicate_collapses_to_the_best_version(stac_collection, make_settings, add_area,
                                                             items_by_date, sample_data_dir, sample_footprint):
    cfg = make_settings(stac_collection.api.url, [stac_collection.id])
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    stac_collection.publish(items_by_date["2020-08-29"])
    poll_all(cfg, now=utc("2020-08-30T00:00:00"))
    reprocessed = json.loads((sample_data_dir / "fixtures" / "S2B_34TER_20200829_1_L2A.json").read_text())
    stac_collection.publish(reprocessed)
    result = poll_all(cfg, now=utc("2020-08-31T00:00:00"))
    assert result.total("items_seen") == 2 and result.total("upgraded_scenes") == 1
    (scene,) = scenes()
    assert scene.item_id == "S2B_34TER_20200829_1_L2A"
    assert scene.processing_baseline == "05.10" and scene.versions_seen == 2
    assert scene.item["id"] == "S2B_34TER_20200829_1_L2A"  # raw JSON of the best version kept

    # The lower-ranked twin arriving again (or first, in another order) never wins.
    with session_scope(get_settings()) as session:
        stats = ingest_items(session, cfg.catalogues[0], scene.catalogue_id, stac_collection.id,
                             [absolute(items_by_date["2020-08-29"])])
    assert stats.unchanged == 1
    assert scenes()[0].item_id == "S2B_34TER_20200829_1_L2A"


@pytest.mark.parametrize(("first", "versions_seen"), [("_0_", 2), ("_1_", 1)])
def test_concurrent_upserts_of_twins_end_with_one_best_scene(db, items_by_date, sample_data_dir, first,
                                                             versions_seen):
    v0 = absolute(items_by_date["2020-08-29"])
    v1 = absolute(json.loads((sample_data_dir / "fixtures" / "S2B_34TER_20200829_1_L2A.json").read_text()))
    # Every thread ingests the twins in the same order, so whichever thread wins the insert race stores the
    # same first version: six racing inserts of it, then (``_0_`` first) six racing upgrades of which exactly
    # one may count, or (``_1_`` first) six re-arrivals of the outranked twin that must change nothing.
    order = [v0, v1] if first == "_0_" else [v1, v0]
    with session_scope(get_settings()) as session:
        catalogue_id = upsert_catalogue(session, CAT)
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def worker():
        try:
            barrier.wait()
            for item in order:
                with session_scope(get_settings()) as session:
                    ingest_items(session, CAT, catalogue_id, "sentinel-2-l2a", [item])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    (scene,) = scenes()
    # versions_seen = upgrades + 1: the stored first version, plus the one upgrade when _0_ came first.
    assert scene.item_id == "S2B_34TER_20200829_1_L2A"
    assert scene.versions_seen == versions_seen


def test_paging_through_many_pages(stac_api, make_settings, add_area, sample_footprint):
    # The shared collection holds all 16 sample items; pages of 3 items.
    cfg = make_settings(stac_api.url, ["sentinel-2-l2a"], page_size=3, lookback_days=3000)
    add_area("forest", sample_footprint, max_cloud_cover=100.0)
    result = poll_all(cfg, now=utc("2020-12-31T00:00:00"))
    assert result.ok, result.polls[0].error
    assert result.total("items_seen") == 16 and result.total("new_scenes") == 16
    assert result.search_requests >= 6  # ceil(16 / 3) pages, each a request
    assert count(Scene) == 16
    assert result.observations_created == 16


def test_cloud_filter_is_sent_as_query(stac_api, make_settings, add_area, sample_footprint):
    cfg = make_settings(stac_api.url, ["sentinel-2-l2a"], lookback_days=3000)
    add_area("forest", sample_footprint, max_cloud_cover=40.0)
    result = poll_all(cfg, now=utc("2020-12-31T00:00:00"))
    covers = [s.cloud_cover for s in scenes()]
    assert result.total("items_seen") == len(covers) and covers and max(covers) <= 40.0
    assert len(covers) == 12  # 16 minus 41.35, 52.96, 99.79 and 100 %; 38.91 % passes


def test_api_failures_keep_the_cursor_and_lose_nothing(stac_collection, make_settings, add_area, fault_proxy,
                                                       items_by_date, sample_footprint):
    for date in ("2020-08-04", "2020-08-29", "2020-07-30"):
        stac_collection.publish(items_by_date[date])
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    # The read timeout must stay well above a real answer's time on a busy machine; stalls last longer.
    cfg = make_settings(fault_proxy.url, [stac_collection.id], page_size=1, lookback_days=40, max_retries=2,
                        timeout_seconds=3.0)
    fault_proxy.stall_seconds = 5.0
    now = utc("2020-08-30T12:00:00")

    # 429 three times: more than the 2 retries allowed.
    fault_proxy.fail(429, 429, 429)
    result = poll_all(cfg, now=now)
    assert not result.ok and "429" in result.polls[0].error
    state = cursor_of(stac_collection.id)
    assert state.cursor is None and "429" in state.last_error

    # A 500 on the second page, after one item was stored: not retried, the poll fails, cursor kept.
    fault_proxy.fail("pass", 500)
    result = poll_all(cfg, now=now)
    assert not result.ok and "500" in result.polls[0].error
    assert result.total("items_seen") == 1 and count(Scene) == 1
    assert cursor_of(stac_collection.id).cursor is None

    # The API stalls past the client's read timeout (no retries left in this configuration): the poll fails.
    no_retry = cfg.model_copy(update={"poll": cfg.poll.model_copy(update={"max_retries": 0})})
    fault_proxy.fail("stall")
    result = poll_all(no_retry, now=now)
    assert not result.ok and "timed out" in result.polls[0].error.lower()
    assert cursor_of(stac_collection.id).cursor is None

    # Recovery within the retry budget (503, then a stall, then an answer): everything arrives.
    fault_proxy.fail(503, "stall")
    result = poll_all(cfg, now=now)
    assert result.ok, result.polls[0].error
    assert result.total("items_seen") == 3 and count(Scene) == 3
    state = cursor_of(stac_collection.id)
    assert state.cursor == now and state.last_error is None
    assert fault_proxy.pending() == 0


def test_malformed_items_are_quarantined_and_do_not_stop_the_poll(db, sample_data_dir, items_by_date):
    bad = [json.loads((sample_data_dir / "fixtures" / name).read_text()) for name in (
        "bad-no-geometry.json", "bad-no-datetime.json", "bad-no-usable-assets.json", "bad-json-types.json",
        "bad-hostile-hrefs.json")]
    bad.append(["not", "an", "object"])
    nul = absolute(items_by_date["2020-08-04"])
    nul["id"] = "nul-byte"
    nul["properties"]["platform"] = "sentinel-2a\u0000"
    bad.append(nul)
    good = absolute(items_by_date["2020-08-29"])
    with session_scope(get_settings()) as session:
        catalogue_id = upsert_catalogue(session, CAT)
        stats = ingest_items(session, CAT, catalogue_id, "sentinel-2-l2a", [bad[0], bad[1], good, *bad[2:]])
    assert stats.items_seen == 8 and stats.new_scenes == 1 and stats.quarantined == 7
    with session_scope(get_settings()) as session:
        reasons = dict(session.execute(select(QuarantinedItem.item_id, QuarantinedItem.reason)).all())
    assert "geometry is null" in reasons["bad-no-geometry"]
    assert "properties.datetime" in reasons["bad-no-datetime"]
    assert reasons["bad-no-usable-assets"].startswith("assets: no usable scl or qa_pixel, red, nir")
    assert "properties.eo:cloud_cover must be a number, got str 'abc'" in reasons["bad-json-types"]
    hostile = reasons["bad-hostile-hrefs"]
    assert "file://" in hostile and "169.254.169.254" in hostile
    assert "NUL" in reasons["nul-byte"]
    assert reasons[None] == "item must be a JSON object, got list"


def test_a_publishable_bad_item_is_quarantined_during_a_real_poll(stac_collection, make_settings, add_area,
                                                                  items_by_date, sample_data_dir, sample_footprint):
    # The no-usable-assets fixture is valid STAC, so the server accepts it; the poller must not.
    bad = json.loads((sample_data_dir / "fixtures" / "bad-no-usable-assets.json").read_text())
    stac_collection.publish(bad)
    stac_collection.publish(items_by_date["2020-08-04"])
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    cfg = make_settings(stac_collection.api.url, [stac_collection.id])
    result = poll_all(cfg, now=utc("2020-08-06T00:00:00"))
    assert result.ok and result.total("items_seen") == 2
    assert result.total("quarantined") == 1 and result.total("new_scenes") == 1
    assert cursor_of(stac_collection.id).cursor is not None


def test_catalogue_rows_are_upserted_by_name(db):
    with session_scope(get_settings()) as session:
        first = upsert_catalogue(session, CAT)
        again = upsert_catalogue(session, CatalogueSettings(name=CAT.name, url="http://127.0.0.1:10"))
    assert first == again


def test_a_catalogue_whose_poll_raises_does_not_stop_the_others(stac_collection, make_settings, add_area,
                                                                  items_by_date, sample_footprint, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from monitor.catalogues import poller

    stac_collection.publish(items_by_date["2020-08-04"])
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    cfg = make_settings(stac_collection.api.url, [stac_collection.id], lookback_days=40)
    broken = cfg.catalogues[0].model_copy(update={"name": "broken"})
    cfg = cfg.model_copy(update={"catalogues": [broken, *cfg.catalogues]})
    real = poller.upsert_catalogue

    def flaky(session, catalogue):
        if catalogue.name == "broken":
            raise OperationalError("INSERT INTO catalogues", {}, Exception("server closed the connection"))
        return real(session, catalogue)

    monkeypatch.setattr(poller, "upsert_catalogue", flaky)
    result = poll_all(cfg, now=utc("2020-08-05T12:00:00"))  # "never raises for a catalogue failure"
    assert not result.ok
    failed = [p for p in result.polls if not p.ok]
    assert [p.catalogue for p in failed] == ["broken"] and "server closed" in failed[0].error
    assert result.total("new_scenes") == 1 and count(Scene) == 1


def test_an_item_with_a_nul_byte_in_its_id_or_collection_is_quarantined_not_fatal(db, items_by_date):
    nul_id = absolute(items_by_date["2020-08-04"])
    nul_id["id"] = "evil\u0000id"
    nul_collection = absolute(items_by_date["2020-07-30"])
    nul_collection["collection"] = "sentinel-2-l2a\u0000"
    good = absolute(items_by_date["2020-08-29"])
    with session_scope(get_settings()) as session:
        catalogue_id = upsert_catalogue(session, CAT)
        stats = ingest_items(session, CAT, catalogue_id, "sentinel-2-l2a", [nul_id, nul_collection, good])
    assert stats.items_seen == 3 and stats.new_scenes == 1 and stats.quarantined == 2
    assert count(Scene) == 1 and count(QuarantinedItem) == 2


def test_an_item_with_a_lone_surrogate_is_quarantined_not_fatal(db, items_by_date):
    # JSON allows "\ud800" escapes; Python decodes them to lone surrogates that UTF-8 (so PostgreSQL) refuses.
    bad = json.loads(json.dumps(absolute(items_by_date["2020-08-04"])).replace('"S2A_34TER', '"\\ud800S2A_34TER', 1))
    good = absolute(items_by_date["2020-08-29"])
    with session_scope(get_settings()) as session:
        catalogue_id = upsert_catalogue(session, CAT)
        stats = ingest_items(session, CAT, catalogue_id, "sentinel-2-l2a", [bad, good])
    assert stats.items_seen == 2 and stats.new_scenes == 1 and stats.quarantined == 1
    assert count(Scene) == 1 and count(QuarantinedItem) == 1


def test_an_item_without_id_is_quarantined_once_across_polls(db):
    no_id = {"type": "Feature", "properties": {}}  # no id, no geometry, no datetime
    for _ in range(3):  # the catalogue keeps returning it on every poll
        with session_scope(get_settings()) as session:
            catalogue_id = upsert_catalogue(session, CAT)
            ingest_items(session, CAT, catalogue_id, "sentinel-2-l2a", [no_id])
    assert count(QuarantinedItem) == 1
