"""Nothing lost late: an item published more than the look-back after it was sensed is found by the late
sweep, logged, counted in ``unirs_late_items_total``, stored, paired and analysed.

Whole-loop style with real parts: the local stac-fastapi-pgstac API (which filters ``query`` on the
typed ``updated`` queryable), the cycle the scheduler runs (``poll_and_pair``: poll, late sweep, pairing),
the real dispatcher and a Celery worker subprocess reading the sample COGs over HTTP on loopback.

Timeline (look-back 10 days): 2020-08-04 is published on time and polled; polls run on 09-12 00:00;
then 2020-08-29 is published on 09-12 01:00 — 13.6 days after sensing. The poll of 09-12 08:00 reads
sensing times from 09-02 08:00 and cannot see it; the late sweep (due: 8 h since the last, every 6 h)
must.
"""

from __future__ import annotations

import copy
import json
import logging
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from core.config import get_settings
from core.db import session_scope
from core.models import Analysis, PollState, Scene
from devtools import localstac
from monitor.catalogues.client import open_client
from monitor.catalogues.late import publication_field, sweep_late_all
from monitor.metrics import exposition
from monitor.scheduler import poll_and_pair
from tests.fixtures_ingest import inner_aoi
from tests.fixtures_workers import run_until_terminal

LATE_ID = "S2B_34TER_20200829_0_L2A"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def published(item: dict, at: str) -> dict:
    """``item`` as a provider publishes it at ``at``: STAC ``created``/``updated`` are the publication time."""
    item = copy.deepcopy(item)
    item["properties"]["created"] = item["properties"]["updated"] = at
    return item


def poll_state(collection: str) -> PollState:
    with session_scope(get_settings()) as session:
        return session.execute(select(PollState).where(PollState.collection == collection)).scalar_one()


@pytest.mark.parametrize("mode", ["auto", "deep"])
def test_an_item_published_after_the_lookback_is_stored_analysed_and_counted(
        mode, stac_collection, make_settings, add_area, items_by_date, sample_footprint, worker_redis,
        start_worker, send_task, caplog):
    cfg = make_settings(stac_collection.api.url, [stac_collection.id], lookback_days=10)
    cfg = cfg.model_copy(update={"broker_url": worker_redis.url,
                                 "catalogues": [cfg.catalogues[0].model_copy(update={"late_sweep": mode})]})
    # Created before the first poll: the deep sweep reads no further back than an area's creation − look-back.
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id],
             created_at=utc("2020-08-01T00:00:00"))

    stac_collection.publish(published(items_by_date["2020-08-04"], "2020-08-04T12:00:00Z"))
    first = poll_and_pair(cfg, now=utc("2020-08-05T00:00:00"))
    assert first.ok and first.new_scenes == 1 and first.late_items == 0
    assert poll_and_pair(cfg, now=utc("2020-09-12T00:00:00")).ok

    stac_collection.publish(published(items_by_date["2020-08-29"], "2020-09-12T01:00:00Z"))
    with caplog.at_level(logging.WARNING, logger="monitor.catalogues.store"):
        cycle = poll_and_pair(cfg, now=utc("2020-09-12T08:00:00"))

    assert cycle.ok, cycle.errors
    assert cycle.new_scenes == 0  # the regular poll's window (from 09-02 08:00) cannot hold it
    assert cycle.late_items == 1 and cycle.analyses_created == 1
    state = poll_state(stac_collection.id)
    assert state.late_items == 1 and state.late_swept_at == utc("2020-09-12T08:00:00")
    assert state.late_mode == ("updated" if mode == "auto" else "deep")
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warning.startswith(f"late item {LATE_ID} of {stac_collection.id}: sensed 2020-08-29")
    assert "first seen 13.9 days later, more than the 10-day look-back" in warning

    with session_scope(get_settings()) as session:
        assert LATE_ID in set(session.execute(select(Scene.item_id)).scalars())
        analysis = session.execute(select(Analysis)).scalar_one()
        assert (analysis.after_scene.item_id, analysis.before_scene.item_id) == (LATE_ID, "S2A_34TER_20200804_0_L2A")
        analysis_id = analysis.id
    worker = start_worker(settings=cfg)
    rows = run_until_terminal([analysis_id], cfg, send_task, workers=[worker])
    assert rows[analysis_id]["status"] == "done", rows

    text = exposition(cfg).decode()
    assert f'unirs_late_items_total{{catalogue="local",collection="{stac_collection.id}"}} 1.0' in text

    # The next sweep is not due for 6 hours; forced, it finds the item again but nothing new is late.
    assert sweep_late_all(cfg, now=utc("2020-09-12T09:00:00")) == []
    again = sweep_late_all(cfg, now=utc("2020-09-12T09:00:00"), force=True)
    assert [r.ok for r in again] == [True] and again[0].stats.items_seen >= 1 and again[0].stats.late_items == 0
    assert poll_state(stac_collection.id).late_items == 1


def test_the_publication_time_filter_is_probed_not_assumed(stac_collection, make_settings, items_by_date,
                                                           fault_proxy):
    stac_collection.publish(published(items_by_date["2020-08-04"], "2020-08-04T12:00:00Z"))
    cfg = make_settings(stac_collection.api.url, [stac_collection.id])
    client = open_client(cfg.catalogues[0], cfg.poll)
    assert publication_field(client, stac_collection.id) == "updated"

    # A server that ignores the `query` term answers the "updated after 9999" probe (then the "created"
    # one) with an item: the sweep must fall back to re-reading by sensing time.
    proxied = make_settings(fault_proxy.url, [stac_collection.id])
    client = open_client(proxied.catalogues[0], proxied.poll)
    fault_proxy.fail(_unfiltered(stac_collection), _unfiltered(stac_collection))
    assert publication_field(client, stac_collection.id) is None
    assert fault_proxy.pending() == 0


def _unfiltered(collection):
    """A proxy action answering with the collection's first page as if the ``query`` were not there."""

    def rewrite(_body: bytes) -> bytes:
        status, page = localstac.http_json("GET", f"{collection.api.url}/collections/{collection.id}/items?limit=1")
        assert status == 200 and len(page["features"]) == 1
        return json.dumps(page).encode()

    return rewrite


def test_an_empty_range_or_a_switched_off_sweep_does_nothing(stac_collection, make_settings, add_area,
                                                             sample_footprint):
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    cfg = make_settings(stac_collection.api.url, [stac_collection.id], lookback_days=100)  # > late_sweep_days
    assert sweep_late_all(cfg, now=utc("2020-09-12T00:00:00"), force=True) == []
    cfg = make_settings(stac_collection.api.url, [stac_collection.id])
    off = cfg.model_copy(update={"catalogues": [cfg.catalogues[0].model_copy(update={"late_sweep": "off"})]})
    assert sweep_late_all(off, now=utc("2020-09-12T00:00:00"), force=True) == []
