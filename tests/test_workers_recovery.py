"""Failure recovery with real processes: a worker killed with SIGKILL mid-analysis, and the broker restarted
(messages lost) mid-run. The lease is 6 s in these tests (UNIRS_ANALYSIS__LEASE_SECONDS); the test-only
hook UNIRS_TEST_TASK_DELAY_SECONDS holds a claimed analysis long enough to act."""

from __future__ import annotations

from sqlalchemy import func, select

from core.config import get_settings
from core.db import session_scope
from core.models import Finding
from monitor.dispatch import dispatch_once
from tests.fixtures_workers import (
    analysis_rows,
    insert_analysis,
    insert_area,
    insert_sample_scenes,
    run_until_terminal,
    wait_for,
)


def _findings_by_kind(analysis_id: int) -> dict[str, int]:
    with session_scope(get_settings()) as session:
        rows = session.execute(select(Finding.kind, func.count()).where(Finding.analysis_id == analysis_id)
                               .group_by(Finding.kind)).all()
    return dict(rows)


def _ordinals(analysis_id: int) -> list[int]:
    with session_scope(get_settings()) as session:
        return list(session.execute(select(Finding.ordinal).where(Finding.analysis_id == analysis_id)
                                    .order_by(Finding.ordinal)).scalars())


def _running(analysis_id: int):
    row = analysis_rows([analysis_id])[analysis_id]
    return row if row["status"] == "running" else None


def test_worker_killed_mid_analysis_completes_exactly_once_after_the_lease(db, worker_settings, cog_server,
                                                                          send_task, start_worker):
    scenes = insert_sample_scenes(worker_settings.catalogues[0], cog_server.url, ["2015-08-31", "2020-08-29"])
    area_id = insert_area(scenes.footprint.buffer(-0.0003))
    analysis_id = insert_analysis(area_id, scenes.ids["2020-08-29"], scenes.ids["2015-08-31"])

    doomed = start_worker(extra_env={"UNIRS_TEST_TASK_DELAY_SECONDS": "600"})
    assert dispatch_once(worker_settings, send=send_task)["queued"] == 1
    first = wait_for(lambda: _running(analysis_id), 60, "the first worker to claim the analysis")
    doomed.kill9()

    # Nobody told the database: the row still says running, held by a dead worker, until its lease ends.
    after_kill = analysis_rows([analysis_id])[analysis_id]
    assert after_kill["status"] == "running" and after_kill["worker"] == first["worker"]

    survivor = start_worker()
    rows = run_until_terminal([analysis_id], worker_settings, send_task, workers=[survivor])
    row = rows[analysis_id]
    assert row["status"] == "done", row
    assert row["attempts"] == 2
    assert row["stats"]["attempt"] == 2 and row["stats"]["worker"] != first["worker"]
    previous = row["stats"]["previous_error"]  # why attempt 1 did not finish, kept for the record
    assert "stopped heartbeating" in previous and first["worker"] in previous
    kinds = _findings_by_kind(analysis_id)
    assert kinds["summary"] == 1 and kinds["region"] >= 1
    ordinals = _ordinals(analysis_id)
    assert ordinals == list(range(len(ordinals)))  # one set of findings


def test_broker_restart_mid_run_loses_nothing(db, worker_settings, worker_redis, cog_server, send_task, start_worker):
    scenes = insert_sample_scenes(worker_settings.catalogues[0], cog_server.url,
                                  ["2015-08-31", "2020-08-29", "2017-07-06", "2017-07-11", "2016-08-15", "2016-08-25"])
    area_id = insert_area(scenes.footprint.buffer(-0.0003))
    ids = [
        insert_analysis(area_id, scenes.ids["2020-08-29"], scenes.ids["2015-08-31"]),
        insert_analysis(area_id, scenes.ids["2017-07-11"], scenes.ids["2017-07-06"]),
        insert_analysis(area_id, scenes.ids["2016-08-25"], scenes.ids["2016-08-15"]),
    ]
    worker = start_worker(extra_env={"UNIRS_TEST_TASK_DELAY_SECONDS": "3"})
    assert dispatch_once(worker_settings, send=send_task)["queued"] == 3
    wait_for(lambda: any(r["status"] == "running" for r in analysis_rows(ids).values()), 60,
             "a worker to start on the first analysis")

    # The running analysis's message and the two still waiting in the queue vanish with the broker.
    worker_redis.restart()

    rows = run_until_terminal(ids, worker_settings, send_task, workers=[worker])
    assert [rows[i]["status"] for i in ids] == ["done", "done", "skipped"], rows
    assert all(rows[i]["attempts"] == 1 for i in ids), "nothing ran twice"
    for analysis_id in ids[:2]:
        assert _findings_by_kind(analysis_id)["summary"] == 1
    # The worker really lost its broker and came back to the same one (not a fresh worker).
    log = worker.log()
    lost = log.index("Connection to broker lost")
    connected = f"Connected to redis://:**@127.0.0.1:{worker_redis.port}/0"  # celery masks the (empty) password
    assert log.count(connected) == 2 and log.rindex(connected) > lost


def test_queued_work_lost_with_the_broker_is_resent_in_the_next_pass(db, worker_settings, worker_redis, cog_server,
                                                                     send_task, start_worker):
    from monitor.dispatch import broker_depth

    # A production-sized lease: the old 2 × lease backstop would wait 30 minutes.
    settings = worker_settings.model_copy(update={"analysis": worker_settings.analysis.model_copy(
        update={"lease_seconds": 900, "queued_resend_seconds": 0.0})})
    depth = broker_depth(settings)
    scenes = insert_sample_scenes(settings.catalogues[0], cog_server.url, ["2015-08-31", "2020-08-29",
                                                                           "2017-07-06", "2017-07-11"])
    area_id = insert_area(scenes.footprint.buffer(-0.0003))
    ids = [insert_analysis(area_id, scenes.ids["2020-08-29"], scenes.ids["2015-08-31"]),
           insert_analysis(area_id, scenes.ids["2017-07-11"], scenes.ids["2017-07-06"])]
    assert dispatch_once(settings, send=send_task, depth=depth)["queued"] == 2  # no worker yet: both wait
    assert depth("cpu") == 2
    again = dispatch_once(settings, send=send_task, depth=depth)
    assert again["lost"] == 0 and again["resent"] == 0, "the broker holds both: nothing is sent twice"

    worker_redis.restart()  # both messages vanish
    assert depth("cpu") == 0
    summary = dispatch_once(settings, send=send_task, depth=depth)
    assert summary["lost"] == 2 and summary["errors"] == [], summary
    assert depth("cpu") == 2
    assert dispatch_once(settings, send=send_task, depth=depth)["lost"] == 0

    worker = start_worker(settings=settings)
    rows = run_until_terminal(ids, settings, send_task, workers=[worker])
    assert [rows[i]["status"] for i in ids] == ["done", "done"], rows
    assert all(rows[i]["attempts"] == 1 for i in ids), "nothing ran twice"
