"""Observation tasks that keep failing are given up, and pairing moves on (core/observations.py attempts).

Real Celery worker processes on the sample's real granules (tests/test_observation_tasks.py's setup): the
middle acquisition's task always raises (the worker's test hook). It is sent exactly
``analysis.observation_max_attempts`` times, its rows end ``failed`` with the last error in the reason, a
WARNING names the acquisition, ``doctor`` reports them, and the area's next clear acquisition pairs with the
earlier clear one instead of waiting for the failed one forever.
"""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import text

from core import observations as job
from core.config import get_settings
from core.db import session_scope
from core.models import Acquisition, Analysis
from eo.observe_rows import outcomes_for
from monitor.doctor import DoctorWarning, check_observations
from monitor.observations import celery_sender, dispatch_observations
from monitor.pairing import process_pending
from tests.fixtures_workers import wait_for
from tests.test_observation_tasks import _rows, _setup
from workers.observe_tasks import TEST_FAIL_ENV


def _attempted(acquisition_id: int, n: int):
    """Rows of ``acquisition_id`` once their n-th attempt has failed (the error noted), else None."""
    rows = {k: r for k, r in _rows().items() if k[1] == acquisition_id}
    with session_scope(get_settings()) as session:
        attempts = session.execute(text("SELECT area_id, attempts FROM observations WHERE acquisition_id = :q"),
                                   {"q": acquisition_id}).all()
    done = all(a.attempts == n for a in attempts) and all(r["reason"] is not None for r in rows.values())
    return rows if done else None


def _others_computed(acquisition_id: int) -> bool:
    return all(r["computed_at"] is not None for k, r in _rows().items() if k[1] != acquisition_id)


def test_an_always_failing_observation_task_gives_up_after_max_attempts_and_pairing_moves_on(
        db, worker_settings, cog_server, start_worker, caplog):
    areas, acquisitions = _setup(worker_settings, cog_server)
    first, middle, last = acquisitions
    expected = {q: outcomes_for(worker_settings, q, areas)[0] for q in (first, last)}
    worker = start_worker(extra_env={TEST_FAIL_ENV: str(middle)})
    real_send = celery_sender(worker_settings)
    sent: list[int] = []

    def send(acquisition_id: int, queue: str) -> None:
        sent.append(acquisition_id)
        real_send(acquisition_id, queue)

    max_attempts = worker_settings.analysis.observation_max_attempts
    assert max_attempts == 3
    for attempt in range(1, max_attempts + 1):
        # resend 0: each pass re-sends what is still due at once (the 10 min delay, shortened).
        dispatch_observations(worker_settings, send=send, resend_seconds=0)
        wait_for(lambda a=attempt: _attempted(middle, a) and _others_computed(middle), 180,
                 f"attempt {attempt} to fail and the other acquisitions to be computed")
    rows = _rows()
    assert sent.count(middle) == max_attempts and sent.count(first) == 1 and sent.count(last) == 1
    error = f"RuntimeError: test hook {TEST_FAIL_ENV}: acquisition {middle} always fails"
    assert {rows[(a, middle)]["status"] for a in areas} == {"pending"}
    assert {rows[(a, middle)]["reason"] for a in areas} == {error}

    # Still in flight by the default re-send delay: nothing sent, nothing given up, and the last acquisition
    # waits for the middle one (an earlier acquisition of its areas that is not computed).
    def no_send(*_):
        pytest.fail("nothing may be sent")

    waiting = process_pending(worker_settings, send_observations=no_send)
    assert waiting.analyses_created == 0
    assert {_rows()[(a, last)]["status"] for a in areas} == {"pending"}

    with caplog.at_level(logging.WARNING, logger="core.observations"):
        gave_up = dispatch_observations(worker_settings, send=send, resend_seconds=0)
    assert (gave_up.gave_up, gave_up.dispatched) == (len(areas), 0)
    assert sent.count(middle) == max_attempts  # exactly N sends, never one more
    reason = f"observation task gave up after 3 attempts, the last failed with {error}"
    failed = _rows()
    assert {failed[(a, middle)]["status"] for a in areas} == {"failed"}
    assert {failed[(a, middle)]["reason"] for a in areas} == {reason}
    with session_scope(worker_settings) as session:
        key = session.get(Acquisition, middle).key
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"acquisition {key} (id {middle}): observation failed for ")
    assert warnings[0].endswith(f": {reason}")

    with pytest.raises(DoctorWarning) as warned:
        check_observations(worker_settings)
    assert str(warned.value).startswith(f"{len(areas)} failed observation(s) in the last 7 days (not paired); "
                                        f"newest: acquisition {key} over ")
    assert str(warned.value).endswith(f": {reason}")

    # Final: not due again, never sent again; the last acquisition now pairs with the first.
    paired = process_pending(worker_settings, send_observations=no_send)
    assert sent.count(middle) == max_attempts
    both_clear = sorted(a for a in areas if expected[first][a].status.value == "clear"
                        and expected[last][a].status.value == "clear")
    assert both_clear, "the sample must have areas clear on both dates for this test to mean anything"
    with session_scope(worker_settings) as session:
        made = {(r.area_id, r.after_scene_id, r.before_scene_id) for r in session.query(Analysis)}
    assert made == {(a, expected[last][a].scene_id, expected[first][a].scene_id) for a in both_clear}
    assert paired.analyses_created == len(both_clear)
    assert "Traceback" in worker.log()  # the failures were real task failures in the worker


def test_attempts_lost_with_their_worker_give_up_with_the_lost_reason(db, worker_settings, cog_server):
    """The in-process path counts attempts too: rows started max_attempts times with no outcome and no error
    noted (a worker that died) are given up when asked to start again, not computed."""
    areas, acquisitions = _setup(worker_settings, cog_server)
    q = acquisitions[0]
    with session_scope(worker_settings) as session:
        for _ in range(3):
            assert job.begin(session, q, 3) == areas  # three starts, none stored anything
        assert job.begin(session, q, 3) == []  # the fourth gives up instead
        rows = session.execute(text("SELECT status::text AS status, reason, attempts FROM observations "
                                    "WHERE acquisition_id = :q"), {"q": q}).all()
    assert {(r.status, r.reason, r.attempts) for r in rows} == {
        ("failed", f"observation task gave up after 3 attempts, {job._LOST}", 3)}
    with session_scope(worker_settings) as session:
        assert job.due_areas(session, q) == []  # given up is final: not retried after FAILED_RETRY_AFTER
        session.execute(text("UPDATE observations SET computed_at = computed_at - interval '2 hours', "
                             "started_at = started_at - interval '2 hours' WHERE acquisition_id = :q"), {"q": q})
        assert job.due_areas(session, q) == []


def test_the_resend_delay_runs_from_the_start_of_a_task_that_waited_in_the_queue(db, worker_settings, cog_server):
    """A backlog in the cpu queue: queued 15 min ago and started 1 min ago is running, not lost (not re-sent);
    queued 15 min ago and never started, or started 11 min ago, is re-sent."""
    _, acquisitions = _setup(worker_settings, cog_server)
    running, waiting, stale = acquisitions
    stamps = {running: ("15 minutes", "1 minute"), waiting: ("15 minutes", None), stale: ("15 minutes", "11 minutes")}
    with session_scope(worker_settings) as session:
        for q, (queued, started) in stamps.items():
            session.execute(text(
                "UPDATE observations SET dispatched_at = now() - CAST(:queued AS interval), attempts = :n, "
                "started_at = now() - CAST(:started AS interval) WHERE acquisition_id = :q"),
                {"q": q, "queued": queued, "started": started, "n": 0 if started is None else 1})
    sent: list[int] = []
    stats = dispatch_observations(worker_settings, send=lambda q, _queue: sent.append(q))
    assert sorted(sent) == sorted([waiting, stale])
    assert stats.dispatched == 2


def test_a_task_no_worker_ever_starts_is_resent_with_a_doubling_delay_and_never_failed(db, worker_settings,
                                                                                      cog_server):
    """Sent with no worker consuming the queue (or every message lost): ``attempts`` never moves. Each send that
    no worker started doubles the delay before the next (10 min, 20, 40 …, at most
    ``analysis.resend_backoff_max_seconds``), the rows stay due — nothing is failed for want of a worker —
    and ``doctor`` says what is wrong. A row a worker started is re-sent after 10 min again."""
    areas, acquisitions = _setup(worker_settings, cog_server)
    started, *lost = acquisitions
    sent: list[int] = []

    def dispatch() -> dict[int, int]:
        dispatch_observations(worker_settings, send=lambda q, _queue: sent.append(q))
        return {q: sent.count(q) for q in acquisitions}

    def age(minutes: int, where: str = "") -> None:
        with session_scope(worker_settings) as session:
            session.execute(text("UPDATE observations SET dispatched_at = dispatched_at - make_interval(mins => :m), "
                                 f"started_at = started_at - make_interval(mins => :m) {where}"), {"m": minutes})

    assert dispatch() == {started: 1, lost[0]: 1, lost[1]: 1}
    age(11)  # past the 10 min re-send delay
    assert dispatch() == {started: 2, lost[0]: 2, lost[1]: 2}
    age(11)  # the second send waits 20 min
    assert dispatch() == {started: 2, lost[0]: 2, lost[1]: 2}
    age(10)
    assert dispatch() == {started: 3, lost[0]: 3, lost[1]: 3}
    with session_scope(worker_settings) as session:  # a worker takes the first acquisition's message at last
        assert job.begin(session, started, worker_settings.analysis.observation_max_attempts) == areas
    age(11)  # the started one: 10 min again; the others' third send waits 40 min
    assert dispatch() == {started: 4, lost[0]: 3, lost[1]: 3}
    age(30)
    assert dispatch() == {started: 5, lost[0]: 4, lost[1]: 4}

    rows = _rows()
    assert {rows[(a, q)]["status"] for a in areas for q in acquisitions} == {"pending"}
    with pytest.raises(DoctorWarning) as warned:
        check_observations(worker_settings)
    assert str(warned.value) == (f"{2 * len(areas)} observation(s) sent up to 4 times, never started by a worker: "
                                 "is a worker consuming the 'cpu' queue? (re-sent with a doubling delay; nothing "
                                 "is lost)")

    # The delay stops doubling at the cap (6 h by default), however many sends went before.
    assert worker_settings.analysis.resend_backoff_max_seconds == 6 * 3600
    only_lost = f"WHERE acquisition_id IN ({lost[0]}, {lost[1]})"
    with session_scope(worker_settings) as session:
        session.execute(text(f"UPDATE observations SET dispatches = 40 {only_lost}"))
    age(359, only_lost)
    assert dispatch() == {started: 5, lost[0]: 4, lost[1]: 4}
    age(2, only_lost)
    assert dispatch() == {started: 5, lost[0]: 5, lost[1]: 5}


def test_the_pairing_line_names_the_rows_given_up_in_its_pass(db, worker_settings, cog_server, caplog):
    """A pass whose only outcome is rows given up still logs its one INFO line, and says how many."""
    areas, acquisitions = _setup(worker_settings, cog_server)
    with session_scope(worker_settings) as session:
        for _ in range(3):  # three starts of the first acquisition, none stored anything (workers died)
            assert job.begin(session, acquisitions[0], 3) == areas
    with caplog.at_level(logging.INFO, logger="monitor.pairing"):
        # limit: only the first acquisition's rows are taken up by this pass
        stats = process_pending(worker_settings, limit=len(areas))
    assert (stats.gave_up, stats.failed, stats.observations) == (len(areas),) * 3
    n = len(areas)
    assert [r.getMessage() for r in caplog.records if r.name == "monitor.pairing"] == [
        f"pairing: {n} observations (0 clear, 0 cloudy, 0 partial, {n} failed of which {n} given up), 0 analyses "
        "created, 0 clear acquisitions without an earlier clear one, 0 granule mask reads"]
