"""Observations computed by real Celery worker processes (``unirs.observe`` on the ``cpu`` queue).

The sample's real Sentinel-2 granules (served over loopback HTTP) and three areas in them; pending
(area, acquisition) rows as a poll leaves them. The scheduler's path: :func:`monitor.observations.
dispatch_observations` sends one message per acquisition (its id only), a worker computes and writes the
fractions, pairing settles them. Checked: the worker writes exactly what the in-process computation
gives, a task run twice writes once, and a task lost with a SIGKILLed worker is sent again and done.
"""

from __future__ import annotations

from typing import Any

import pytest
from shapely.geometry import box
from sqlalchemy import text

from core.config import get_settings
from core.db import session_scope
from core.models import Observation, Scene
from eo.observe_rows import observe_rows, outcomes_for
from monitor.observations import dispatch_observations
from monitor.pairing import process_pending
from tests.fixtures_workers import insert_area, insert_sample_scenes, wait_for
from workers.observe_tasks import TEST_DELAY_ENV

DATES = ["2015-08-31", "2019-08-20", "2020-08-29"]


def _setup(worker_settings, cog_server) -> tuple[list[int], list[int]]:
    scenes = insert_sample_scenes(worker_settings.catalogues[0], cog_server.url, DATES)
    minx, miny, maxx, maxy = scenes.footprint.bounds
    w, h = maxx - minx, maxy - miny
    areas = [insert_area(box(minx + w * a, miny + h * b, minx + w * c, miny + h * d))
             for a, b, c, d in ((0.1, 0.1, 0.5, 0.5), (0.4, 0.4, 0.9, 0.9), (0.05, 0.6, 0.3, 0.95))]
    with session_scope(get_settings()) as session:
        acquisitions = sorted({session.get(Scene, s).acquisition_id for s in scenes.ids.values()})
        for acquisition_id in acquisitions:
            for area_id in areas:
                session.add(Observation(area_id=area_id, acquisition_id=acquisition_id))
    return areas, acquisitions


def _rows() -> dict[tuple[int, int], dict[str, Any]]:
    with session_scope(get_settings()) as session:
        rows = session.execute(text(
            "SELECT area_id, acquisition_id, status::text AS status, covered_fraction, clear_fraction, reason, "
            "scene_id, computed_at, dispatched_at FROM observations")).mappings().all()
    return {(r["area_id"], r["acquisition_id"]): dict(r) for r in rows}


def _all_computed():
    rows = _rows()
    return rows if all(r["computed_at"] is not None for r in rows.values()) else None


def test_a_real_worker_computes_what_the_scheduler_would_and_pairing_settles_it(db, worker_settings, cog_server,
                                                                               start_worker):
    areas, acquisitions = _setup(worker_settings, cog_server)
    expected = {q: outcomes_for(worker_settings, q, areas)[0] for q in acquisitions}  # reads only, writes nothing
    worker = start_worker()
    sent = dispatch_observations(worker_settings)
    assert sent.dispatched == len(acquisitions)
    assert dispatch_observations(worker_settings).dispatched == 0  # in flight: not sent twice
    rows = wait_for(_all_computed, 180, "the worker to compute every observation")
    for (area_id, acquisition_id), row in rows.items():
        outcome = expected[acquisition_id][area_id]
        stored = "pending" if outcome.status.value == "clear" else outcome.status.value
        assert (row["status"], row["covered_fraction"], row["clear_fraction"], row["reason"], row["scene_id"]) == (
            stored, outcome.covered, outcome.clear, outcome.reason, outcome.scene_id), worker.log_tail()
    assert "pending" in {r["status"] for r in rows.values()}  # clear ones wait for pairing

    def no_dispatch(*_):
        pytest.fail("nothing is due: nothing may be sent")

    paired = process_pending(worker_settings, send_observations=no_dispatch)
    assert paired.analyses_created >= 1
    settled = _rows()
    assert all(r["status"] != "pending" for r in settled.values())
    assert all(settled[k]["computed_at"] == rows[k]["computed_at"] for k in rows)


def test_an_observation_task_run_twice_writes_once(db, worker_settings, cog_server, start_worker):
    from monitor.observations import celery_sender

    areas, acquisitions = _setup(worker_settings, cog_server)
    worker = start_worker()
    send = celery_sender(worker_settings)
    send(acquisitions[-1], "cpu")
    send(acquisitions[-1], "cpu")  # a duplicate message (re-delivery, re-send racing the first)
    wait_for(lambda: worker.log().count("observations computed") >= 2, 180, "both messages to be processed")
    assert "0 observations computed" in worker.log()  # the second found nothing due
    first = _rows()
    done = [k for k, r in first.items() if r["computed_at"] is not None]
    assert sorted(done) == sorted((a, acquisitions[-1]) for a in areas)
    # Pairing settles them; a late run of the task then changes nothing (never back to pending).
    process_pending(worker_settings, area_ids=areas)
    settled = _rows()
    assert observe_rows(worker_settings, acquisitions[-1]).computed == 0
    assert _rows() == settled


def test_a_task_lost_with_a_killed_worker_is_sent_again_and_done(db, worker_settings, cog_server, start_worker):
    areas, acquisitions = _setup(worker_settings, cog_server)
    doomed = start_worker(extra_env={TEST_DELAY_ENV: "600"})
    assert dispatch_observations(worker_settings).dispatched == len(acquisitions)
    wait_for(lambda: f"test hook {TEST_DELAY_ENV}" in doomed.log(), 60, "the doomed worker to take a task")
    doomed.kill9()
    rows = _rows()
    assert all(r["computed_at"] is None and r["dispatched_at"] is not None for r in rows.values())
    # In flight as far as the database knows, until the re-send delay has passed.
    assert dispatch_observations(worker_settings).dispatched == 0
    survivor = start_worker()
    # The killed worker's messages died with it (one taken, the rest prefetched or still queued): re-sent.
    assert dispatch_observations(worker_settings, resend_seconds=0).dispatched == len(acquisitions)
    done = wait_for(_all_computed, 180, "the survivor to compute every observation")
    assert survivor.log().count("observations computed") >= len(acquisitions)
    expected = {q: outcomes_for(worker_settings, q, areas)[0] for q in acquisitions}
    for (area_id, acquisition_id), row in done.items():
        assert row["covered_fraction"] == expected[acquisition_id][area_id].covered


@pytest.mark.parametrize("held", ["poll-cycle", "pairing"])
def test_the_dispatch_job_skips_pairing_while_a_poll_or_pairing_run_holds_its_lock(db, worker_settings, cog_server,
                                                                                  held):
    """Observing an acquisition mid-poll would read an incomplete mosaic; waiting would stall dispatch."""
    from monitor.locks import CYCLE_LOCK, PAIR_LOCK, AdvisoryLock
    from monitor.scheduler import pair_and_dispatch

    _setup(worker_settings, cog_server)
    lock = AdvisoryLock(CYCLE_LOCK if held == "poll-cycle" else PAIR_LOCK, worker_settings.database_url)
    assert lock.try_acquire()
    try:
        result = pair_and_dispatch(worker_settings)  # returns: neither waited for the lock nor raised
        assert isinstance(result, dict)
        assert {r["dispatched_at"] for r in _rows().values()} == {None}
    finally:
        lock.release()
    pair_and_dispatch(worker_settings)
    assert None not in {r["dispatched_at"] for r in _rows().values()}  # sent once the lock is free
