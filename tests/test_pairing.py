"""Pairing: AOI clear fraction from real SCL COGs over HTTP, before-scene choice, the analysis outbox row.

The shared sample collection has 16 real acquisitions of tile 34TER (2015–2020). Over the inner AOI
used here (SCL, classes 4–7 clear), clear fractions are: 100 % on the clear dates, 0 % on 2016-08-25 and
2020-09-18, 11 % on 2017-08-30, 21 % on 2018-11-08 (eo:cloud_cover 0 but half the scene is cloud
shadow), 34 % on 2019-08-30 and 81 % on 2020-07-30 (41 % scene cloud cover, elsewhere).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from shapely.affinity import translate
from sqlalchemy import func, select, text, update

from core.config import AnalysisSettings, ModelSettings, Settings, get_settings
from core.db import session_scope
from core.jobs import requested_analyser
from core.models import Acquisition, Analysis, Observation, Scene
from eo.masks import clear_fraction
from eo.questions import question_set_id, templates_version
from monitor.catalogues import poll_all
from monitor.pairing import (
    idempotency_key,
    process_pending,
    seasonal_match,
)
from tests.fixtures_ingest import inner_aoi

NOW = datetime(2020, 12, 31, tzinfo=UTC)


def observations(area_id: int) -> dict[str, tuple[str, float | None, str | None]]:
    with session_scope(get_settings()) as session:
        rows = session.execute(
            select(Acquisition.sensed_at.label("acquired_at"), Observation.status, Observation.clear_fraction,
                   Observation.reason)
            .join(Acquisition, Acquisition.id == Observation.acquisition_id)
            .where(Observation.area_id == area_id)
        ).all()
    return {r.acquired_at.date().isoformat(): (r.status.value, r.clear_fraction, r.reason) for r in rows}


def pairs(area_id: int) -> dict[str, tuple[str, str, Analysis]]:
    """after date -> (before date, pair reason, analysis)."""
    with session_scope(get_settings()) as session:
        rows = session.execute(select(Analysis).where(Analysis.area_id == area_id)).scalars().all()
        return {a.after_scene.acquired_at.date().isoformat(): (a.before_scene.acquired_at.date().isoformat(),
                                                               a.pair_reason, a) for a in rows}


# --- pure rules ------------------------------------------------------------------------------------


def test_requested_analyser_follows_the_gpu_workers_setting_not_the_weights():
    assert requested_analyser(Settings()).id == "spectral@1"
    # The scheduler has no weights in docker-compose: what it can see is whether GPU workers exist.
    with_weights_only = Settings(model=ModelSettings(weights_path=Path("/srv/models/unirs-2026-03")))
    assert requested_analyser(with_weights_only).id == "spectral@1"
    with_gpu = Settings(analysis=AnalysisSettings(gpu_workers=1))
    assert requested_analyser(with_gpu).id == "unirs+spectral@1"


def test_question_set_ids():
    version = templates_version()
    assert question_set_id(["roads", "deforestation", "roads"]) == f"deforestation,roads@{version}"
    assert question_set_id([]) == f"@{version}"


def test_idempotency_key_covers_every_ingredient():
    base = (1, "a|t|x", "a|t|y", "spectral@1", "q@1", "latest")
    key = idempotency_key(*base)
    assert len(key) == 64 and key == idempotency_key(*base)
    for i, other in enumerate((2, "a|t|z", None, "unirs+spectral@1", "r@1", "seasonal")):
        changed = list(base)
        changed[i] = other
        assert idempotency_key(*changed) != key


def test_clear_fraction_from_scl_and_qa_pixel():
    scl = np.array([[4, 5, 6, 7], [8, 9, 3, 0]], dtype=np.uint8)
    inside = np.ones_like(scl, dtype=bool)
    assert clear_fraction("scl", scl, inside) == 0.5
    inside[1] = False
    assert clear_fraction("scl", scl, inside) == 1.0
    assert clear_fraction("scl", scl, np.zeros_like(inside)) == 0.0
    clear, water, cloud, shadow, fill = 1 << 6, 1 << 7, (1 << 3) | (1 << 1), 1 << 4, 1
    # 0: no bit at all (neither clear nor water): not clear, the same verdict pairing and workers give.
    qa = np.array([clear, water, cloud, shadow | clear, fill, 0], dtype=np.uint16)
    assert clear_fraction("qa_pixel", qa, np.ones(6, dtype=bool)) == 2 / 6
    with pytest.raises(ValueError, match="no clear-pixel rule for mask band 'fmask'"):
        clear_fraction("fmask", qa, np.ones(6, dtype=bool))


def test_seasonal_match_is_years_back_and_days_off_the_same_day_of_year():
    after = datetime(2020, 8, 29, tzinfo=UTC)
    assert seasonal_match(datetime(2015, 8, 31, tzinfo=UTC), after) == (5, 2)
    assert seasonal_match(datetime(2019, 8, 30, tzinfo=UTC), after) == (1, 1)
    assert seasonal_match(datetime(2019, 8, 20, tzinfo=UTC), after) == (1, 9)
    assert seasonal_match(datetime(2020, 8, 4, tzinfo=UTC), after) is None  # same season, not a year back
    # Across New Year: 2018-12-30 is 5 days from 2019-01-04 (the after date moved one year back).
    assert seasonal_match(datetime(2018, 12, 30, tzinfo=UTC), datetime(2020, 1, 4, tzinfo=UTC)) == (1, 5)
    # 29 February moved into a non-leap year is 28 February.
    assert seasonal_match(datetime(2019, 2, 28, tzinfo=UTC), datetime(2020, 2, 29, tzinfo=UTC)) == (1, 0)


# --- against the local STAC API and COG server ----------------------------------------------------


def test_latest_and_seasonal_pairing_over_the_full_history(stac_api, make_settings, add_area, sample_footprint):
    cfg = make_settings(stac_api.url, ["sentinel-2-l2a"], lookback_days=3000)
    aoi = inner_aoi(sample_footprint)
    latest = add_area("forest latest", aoi, max_cloud_cover=100.0, questions=["roads", "deforestation"])
    seasonal = add_area("forest seasonal", aoi, max_cloud_cover=100.0, pairing_policy="seasonal")
    # Within the grouping distance but outside every footprint: searched together, observed never.
    far = add_area("nearby field", translate(aoi, xoff=0.2), max_cloud_cover=100.0)

    polled = poll_all(cfg, now=NOW)
    assert polled.ok and polled.search_requests == 1  # one search for the three areas
    stats = process_pending(cfg)
    assert stats.observations == 32 and stats.failed == 0
    assert observations(far) == {}

    obs = observations(latest)
    assert obs["2018-11-08"][0] == "cloudy"
    assert obs["2018-11-08"][2] == "AOI clear fraction 21% is below the area's minimum 70%"
    assert obs["2016-08-25"][:2] == ("cloudy", 0.0)
    assert obs["2020-07-30"][0] == "clear" and obs["2020-07-30"][1] > 0.8
    assert obs["2015-08-31"][2] == ("no earlier clear acquisition of tile 34TER orbit R136 "
                                    "(≥ 70% clear over the area; 0 candidates checked)")

    latest_pairs = pairs(latest)
    assert set(latest_pairs) == {"2016-08-15", "2017-07-06", "2017-07-11", "2018-08-25", "2019-06-16", "2019-07-01",
                                 "2019-08-20", "2020-07-30", "2020-08-04", "2020-08-29"}
    before, reason, analysis = latest_pairs["2020-08-29"]
    assert before == "2020-08-04"
    assert reason == "latest earlier clear acquisition of tile 34TER orbit R136: 2020-08-04 (clear 100%)"
    # 2018-11-08 (shadow) and 2019-08-30 (cloud) are skipped; 2019-06-16 is the latest clear one.
    assert latest_pairs["2019-07-01"][0] == "2019-06-16"
    assert latest_pairs["2019-06-16"][0] == "2018-08-25"
    questions = f"deforestation,roads@{templates_version()}"
    assert analysis.status.value == "pending" and analysis.question_set == questions
    assert analysis.idempotency_key == idempotency_key(
        latest, analysis.after_scene.acquisition_key, analysis.before_scene.acquisition_key, "spectral@1",
        questions, "latest")

    seasonal_pairs = pairs(seasonal)
    before, reason, _ = seasonal_pairs["2020-08-29"]
    # The most recent earlier year first: 2019-08-30 (1 day off) is cloudy over the area, 2019-08-20 (9 days)
    # is clear — preferred to 2015-08-31 (2 days off, but five years of change ago).
    assert before == "2019-08-20"
    assert reason == ("seasonal baseline: clear acquisition of tile 34TER orbit R136 near the same day of year in "
                      "the most recent earlier year that has one: 2019-08-20 (clear 100%, 9 days from 2019-08-29)")
    assert seasonal_pairs["2019-08-20"][0] == "2018-08-25"
    assert "2017-07-11" not in seasonal_pairs  # nothing clear within ±30 days in 2015–2016
    assert seasonal_pairs["2016-08-15"][0] == "2015-08-31"
    no_season = observations(seasonal)["2017-07-11"][2]
    assert no_season.startswith("no clear acquisition of tile 34TER orbit R136 within ±30 days of the same day")

    # Idempotent: nothing pending, and re-running changes nothing.
    again = process_pending(cfg)
    assert again.observations == 0 and again.analyses_created == 0


def test_cloudy_new_scene_creates_no_analysis(stac_collection, make_settings, add_area, items_by_date,
                                              sample_footprint):
    cfg = make_settings(stac_collection.api.url, [stac_collection.id], lookback_days=100)
    area = add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    for date in ("2018-08-25", "2018-11-08"):
        stac_collection.publish(items_by_date[date])
    poll_all(cfg, now=datetime(2018, 11, 10, tzinfo=UTC))
    stats = process_pending(cfg)
    assert (stats.clear, stats.cloudy, stats.analyses_created) == (1, 1, 0)
    assert observations(area)["2018-11-08"][0] == "cloudy"


def test_unreadable_cloud_mask_is_a_failed_observation(stac_collection, make_settings, add_area, items_by_date,
                                                       sample_footprint, cog_server):
    import copy

    item = copy.deepcopy(items_by_date["2020-08-04"])
    item["assets"]["scl"]["href"] = cog_server.href("cogs/2020-08-04/missing-scl.tif")
    stac_collection.publish(item)
    cfg = make_settings(stac_collection.api.url, [stac_collection.id])
    area = add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    poll_all(cfg, now=datetime(2020, 8, 6, tzinfo=UTC))
    stats = process_pending(cfg)
    assert stats.failed == 1 and stats.analyses_created == 0
    status, fraction, reason = observations(area)["2020-08-04"]
    assert status == "failed" and fraction is None
    assert reason.startswith("cloud mask unreadable: cannot read http://127.0.0.1:") and "missing-scl.tif" in reason


def test_failed_observation_is_retried_and_still_gets_its_own_analysis(
        stac_collection, make_settings, add_area, items_by_date, sample_footprint, monkeypatch):
    import eo.observe_rows as observations_module
    from eo.cog import CogReadError

    for date in ("2020-07-30", "2020-08-04", "2020-08-29"):
        stac_collection.publish(items_by_date[date])
    cfg = make_settings(stac_collection.api.url, [stac_collection.id], lookback_days=40)
    area = add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    poll_all(cfg, now=datetime(2020, 8, 30, tzinfo=UTC))

    real = observations_module.observe_acquisition
    failures = {"2020-08-04": 1}  # one transient network error on the 08-04 cloud mask

    def flaky(granules, areas, **kw):
        for date, left in failures.items():
            href = granules[0].assets["scl"]["href"]
            if left and date.replace("-", "") in href.replace("-", ""):
                failures[date] -= 1
                raise CogReadError(href, "HTTP 503")
        return real(granules, areas, **kw)

    monkeypatch.setattr(observations_module, "observe_acquisition", flaky)
    process_pending(cfg)
    assert observations(area)["2020-08-04"][0] == "failed"
    # 08-04 is not known to be clear at this point: 08-29 pairs with the latest acquisition that is.
    assert pairs(area)["2020-08-29"][0] == "2020-07-30"
    with session_scope(get_settings()) as session:  # the retry is due an hour later
        session.execute(update(Observation).values(computed_at=Observation.computed_at - timedelta(hours=2)))
    process_pending(cfg)
    # 08-04 was a new acquisition too: its own analysis (against 07-30) is not lost.
    assert observations(area)["2020-08-04"][0] == "clear"
    assert pairs(area)["2020-08-04"][0] == "2020-07-30"


def test_one_acquisition_that_cannot_be_paired_does_not_hold_back_the_others_of_its_batch(
        stac_api, make_settings, add_area, sample_footprint):
    cfg = make_settings(stac_api.url, ["sentinel-2-l2a"], lookback_days=3000)
    area = add_area("forest latest", inner_aoi(sample_footprint), max_cloud_cover=100.0)
    assert poll_all(cfg, now=NOW).ok
    with session_scope(cfg) as session:
        refused = session.execute(select(Scene.id).where(func.date(Scene.acquired_at) == datetime(2020, 8, 29).date())
                                  ).scalar_one()
        # A real database failure for that acquisition's analysis (not a mock): its insert raises.
        session.execute(text(f"""
            CREATE FUNCTION refuse_analysis() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.after_scene_id = {refused} THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$;
            CREATE TRIGGER refuse_analysis BEFORE INSERT ON analyses FOR EACH ROW EXECUTE FUNCTION refuse_analysis();
        """))
    first = process_pending(cfg)
    paired = pairs(area)
    # Every clear acquisition but the refused one is settled (one batch held them all; it was retried one by one).
    assert set(paired) == {"2016-08-15", "2017-07-06", "2017-07-11", "2018-08-25", "2019-06-16", "2019-07-01",
                           "2019-08-20", "2020-07-30", "2020-08-04"}
    assert first.analyses_created == 9
    # Counted once: what the retried acquisitions settled, not also what the failed batch had counted.
    settled = [o for o in observations(area).values() if o[0] == "clear"]
    assert first.clear == len(settled) and first.no_before == len(settled) - 9
    status, clear, reason = observations(area)["2020-08-29"]
    assert (status, reason) == ("pending", None) and clear is not None
    assert observations(area)["2020-08-04"][0] == "clear"
    with session_scope(cfg) as session:
        session.execute(text("DROP TRIGGER refuse_analysis ON analyses; DROP FUNCTION refuse_analysis()"))
    again = process_pending(cfg)
    assert again.analyses_created == 1
    assert pairs(area)["2020-08-29"][0] == "2020-08-04"
    assert observations(area)["2020-08-29"][0] == "clear"


def _reltuples() -> dict[str, float]:
    with session_scope(get_settings()) as session:
        return dict(session.execute(text("SELECT relname, reltuples FROM pg_class WHERE relname IN "
                                         "('observations', 'acquisitions')")).all())


def test_pairing_analyses_the_observation_tables_when_their_statistics_are_missing_or_stale(db):
    """A poll adds thousands of observation rows and the workers fill them in faster than autovacuum analyses
    them; pairing's plans need the row counts: it ANALYZEs a table never analysed or changed by more than
    STALE_SHARE of its rows (plus STALE_ROWS) since, and leaves one that is not."""
    from geoalchemy2.shape import from_shape
    from shapely.geometry import MultiPolygon, box

    from core.models import Area
    from monitor.pairing import STALE_ROWS, STALE_SHARE, refresh_statistics

    with session_scope(get_settings()) as session:
        session.execute(text("TRUNCATE observations, acquisitions, areas RESTART IDENTITY CASCADE"))
        # autovacuum's own ANALYZE (its threshold is below these changes) would race the one under test
        for table in ("observations", "acquisitions"):
            session.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = off)"))
    assert _reltuples() == {"observations": -1.0, "acquisitions": -1.0}  # TRUNCATE forgets the statistics
    with session_scope(get_settings()) as session:
        session.add_all(Area(name=f"a{i}", geom=from_shape(MultiPolygon([box(i, 0, i + 0.01, 0.01)]), srid=4326),
                             area_km2=1.0, collections=["c"], max_cloud_cover=80.0, min_clear_fraction=0.5,
                             recipients=[], questions=[], properties={}) for i in range(50))
        session.add_all(Acquisition(key=f"sentinel-2b|{k}", platform="sentinel-2b",
                                    sensed_at=NOW - timedelta(days=5 * k)) for k in range(40))
    _changed("INSERT INTO observations (area_id, acquisition_id, status) "
             "SELECT a.id, q.id, 'pending' FROM areas a CROSS JOIN acquisitions q")
    with session_scope(get_settings()) as session:
        assert refresh_statistics(session) == ["acquisitions", "observations"]
    assert _reltuples() == {"observations": 2000.0, "acquisitions": 40.0}
    # Changed rows up to the threshold (0.2 * 2000 + 1000 = 1400) leave the statistics alone; beyond, ANALYZE.
    assert STALE_SHARE * 2000 + STALE_ROWS == 1400
    _changed("UPDATE observations SET computed_at = now() WHERE area_id <= 25")  # 1,000 rows
    with session_scope(get_settings()) as session:
        assert refresh_statistics(session) == []
    _changed("UPDATE observations SET computed_at = now() WHERE area_id > 37")  # 500 more
    with session_scope(get_settings()) as session:
        assert refresh_statistics(session) == ["observations"]
    with session_scope(get_settings()) as session:
        assert refresh_statistics(session) == []
        for table in ("observations", "acquisitions"):
            session.execute(text(f"ALTER TABLE {table} RESET (autovacuum_enabled)"))


def _changed(sql: str) -> None:
    """Run ``sql`` and have its row counts reach the statistics views when it commits (they are sent lazily)."""
    with session_scope(get_settings()) as session:
        session.execute(text(sql))
        session.execute(text("SELECT pg_stat_force_next_flush()"))
