"""core.jobs: the analyser identity, queue routing, and the status transitions against a real database."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select, text

from core import jobs
from core.config import AnalysisSettings, Settings, get_settings
from core.db import session_scope
from core.jobs import AnalyserSpec, Queue
from core.models import Analysis, AnalysisStatus


def test_analyser_spec_round_trips_and_refuses_what_it_cannot_name():
    for text_id, spec in (("spectral@1", AnalyserSpec()),
                          ("unirs+spectral@1", AnalyserSpec(model=True)),
                          ("unirs@tiny.0badc0de+spectral@1", AnalyserSpec(model=True, checkpoint="tiny.0badc0de"))):
        assert spec.id == text_id
        assert AnalyserSpec.parse(text_id) == spec
    assert AnalyserSpec.parse("unirs@ckpt+spectral@1").requested().id == "unirs+spectral@1"
    assert AnalyserSpec(model=True).ran_with(None).id == "spectral@1"  # asked for the model, had none
    assert AnalyserSpec(model=True).ran_with("tiny.1").id == "unirs@tiny.1+spectral@1"
    assert AnalyserSpec().ran_with("tiny.1").id == "spectral@1"  # spectral-only requests never run the model
    for bad in ("spectral", "unirs@x", "gpt@4+spectral@1", ""):
        with pytest.raises(ValueError):
            AnalyserSpec.parse(bad)
    with pytest.raises(ValueError):
        AnalyserSpec(model=True, checkpoint="a+b")


def test_queue_routing():
    assert jobs.queue_for("spectral@1") is Queue.CPU
    assert jobs.queue_for(AnalyserSpec(model=True)) is Queue.GPU
    assert jobs.queue_for("unirs@old-label+spectral@1") is Queue.GPU


@pytest.fixture
def one_pending(db, add_area, make_settings, stac_collection, items_by_date, sample_footprint):
    """One pending analysis row on real area and scene rows."""
    from monitor.catalogues import poll_all
    from tests.fixtures_ingest import inner_aoi

    stac_collection.publish(items_by_date["2020-08-04"])
    area_id = add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    poll_all(make_settings(stac_collection.api.url, [stac_collection.id]), now=datetime(2020, 8, 6, tzinfo=UTC))
    with session_scope(get_settings()) as session:
        scene_id = session.execute(text("SELECT id FROM scenes LIMIT 1")).scalar_one()
        analysis_id = jobs.create_pending(session, idempotency_key="k1", area_id=area_id, after_scene_id=scene_id,
                                          before_scene_id=None, analyser=AnalyserSpec(model=True, checkpoint="c"),
                                          question_set="@1", pairing_policy="latest", pair_reason=None)
        again = jobs.create_pending(session, idempotency_key="k1", area_id=area_id, after_scene_id=scene_id,
                                    before_scene_id=None, analyser=AnalyserSpec(), question_set="@1",
                                    pairing_policy="latest", pair_reason=None)
    assert again is None  # the idempotency key makes the outbox insert exactly-once
    return analysis_id


def _row(analysis_id: int) -> Analysis:
    with session_scope(get_settings()) as session:
        return session.execute(select(Analysis).where(Analysis.id == analysis_id)).scalar_one()


def test_transitions_walk_the_state_machine(one_pending):
    settings = Settings(analysis=AnalysisSettings(max_attempts=2, lease_seconds=60))
    row = _row(one_pending)
    assert row.status is AnalysisStatus.PENDING and row.analyser == "unirs+spectral@1"  # stored as the request
    with session_scope(get_settings()) as session:
        moved = jobs.queue_next_pending(session)
    assert (moved.id, moved.queue) == (one_pending, Queue.GPU)
    assert _row(one_pending).status is AnalysisStatus.QUEUED

    with session_scope(get_settings()) as session:
        claim = jobs.claim(session, one_pending, "w1", settings)
        assert jobs.claim(session, one_pending, "w2", settings)["worker"] == "w1"  # taken: its state comes back
    assert claim.attempts == 1 and _row(one_pending).status is AnalysisStatus.RUNNING

    with session_scope(get_settings()) as session:
        assert jobs.release(session, claim, "HTTP 503", settings) is AnalysisStatus.QUEUED
    with session_scope(get_settings()) as session:
        second = jobs.claim(session, one_pending, "w2", settings)
        assert not jobs.extend_lease(session, claim, 60)  # the first claim is fenced off
        with pytest.raises(jobs.LeaseLost):
            jobs.finish(session, claim, AnalysisStatus.DONE, stats={})
    with session_scope(get_settings()) as session:
        with pytest.raises(ValueError, match="not a final status"):
            jobs.finish(session, second, AnalysisStatus.QUEUED, stats={})
        jobs.finish(session, second, AnalysisStatus.DONE, stats={"x": float("nan")},
                    analyser_run=AnalyserSpec(model=True, checkpoint="tiny.1"))
    row = _row(one_pending)
    assert (row.status, row.attempts, row.worker, row.analyser_run, row.stats) == (
        AnalysisStatus.DONE, 2, "w2", "unirs@tiny.1+spectral@1", {"x": None})
    with session_scope(get_settings()) as session:
        assert jobs.claim(session, one_pending, "w3", settings)["status"] == "done"  # finished rows stay finished


def test_lost_leases_are_requeued_then_failed(one_pending):
    settings = Settings(analysis=AnalysisSettings(max_attempts=1, lease_seconds=60))
    with session_scope(get_settings()) as session:
        jobs.claim(session, one_pending, "w1", settings)
        session.execute(text("UPDATE analyses SET lease_expires_at = now() - interval '1 s'"))
    with session_scope(get_settings()) as session:
        assert jobs.requeue_lost(session, settings) is None  # out of attempts: not re-queued …
        failed = jobs.fail_lost(session, settings, limit=10)
    assert [m.id for m in failed] == [one_pending]  # … but failed with the reason
    row = _row(one_pending)
    assert row.status is AnalysisStatus.FAILED and row.last_error.startswith("worker lost 1 times; last worker w1")


def test_only_core_jobs_writes_the_analysis_status():
    """grep-level rule of the architecture: no other module spells an analysis status transition."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    pattern = re.compile(r"(UPDATE\s+analyses\s+SET[^;]*\bstatus\s*=|status\s*=\s*AnalysisStatus\.)", re.I | re.S)
    offenders = []
    for package in ("core", "eo", "monitor", "workers", "devtools"):
        for path in (root / package).rglob("*.py"):
            if path == root / "core" / "jobs.py":
                continue
            if pattern.search(path.read_text(encoding="utf-8")):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []
