"""Scheduler leadership (real `unirs-monitor scheduler` subprocesses), the watchdog, and the cron CLI."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from core.config import get_settings
from monitor.locks import LEADER_LOCK, AdvisoryLock, libpq_url, lock_key
from monitor.scheduler import Scheduler
from tests.fixtures_ingest import inner_aoi, loopback_catalogue

CLI = [str(Path(sys.executable).with_name("unirs-monitor"))]


def leader_pids(database_url: str) -> list[int]:
    """OS pids (from application_name) of the sessions holding the leader lock."""
    key = lock_key(LEADER_LOCK)
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::oid AND l.objid = %s::oid "
            # Advisory locks are per database: schedulers of other databases on this server are not ours.
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
        ).fetchall()
    return [int(re.search(r"pid=(\d+)", r[0]).group(1)) for r in rows]


def wait_for(predicate, what: str, deadline_seconds: float = 120.0):
    """Poll until predicate() is truthy; the deadline only stops a hung test, it measures nothing."""
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start_scheduler(tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    env = {**os.environ, "UNIRS_CATALOGUES": "[]", "UNIRS_LOG_LEVEL": "INFO"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([*CLI, "scheduler", "--jobs", "pair", "--retry-seconds", "1"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def test_two_schedulers_one_leader_and_failover(db, tmp_path):
    first, first_log = start_scheduler(tmp_path, "first")
    second, second_log = start_scheduler(tmp_path, "second")
    procs = {first.pid: first, second.pid: second}
    logs = {first.pid: first_log, second.pid: second_log}
    try:
        leader = wait_for(lambda: leader_pids(db), "a leader")
        (standby,) = set(procs) - set(leader)  # exactly one of the two holds the lock
        wait_for(lambda: "standing by" in logs[standby].read_text(), "the stand-by to say so")
        time.sleep(2)  # a few retry rounds: still exactly one leader
        assert leader_pids(db) == leader
        assert "this scheduler is now the leader" in logs[leader[0]].read_text()
        assert "this scheduler is now the leader" not in logs[standby].read_text()

        # The leader dies without any cleanup: its connection closes and the stand-by takes over.
        os.kill(leader[0], signal.SIGKILL)
        procs[leader[0]].wait()
        assert wait_for(lambda: leader_pids(db) == [standby], "the stand-by to take over")

        # SIGTERM stops the new leader cleanly and releases the lock.
        os.kill(standby, signal.SIGTERM)
        assert procs[standby].wait(timeout=60) == 0
        wait_for(lambda: leader_pids(db) == [], "the lock to be released")
        log = logs[standby].read_text()
        assert log.index("standing by") < log.index("this scheduler is now the leader") < log.index("scheduler stopped")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_leader_that_loses_its_lock_connection_stops_and_stands_by(db, caplog):
    caplog.set_level(logging.INFO, logger="monitor")
    scheduler = Scheduler(get_settings(), jobs=("pair",), retry_seconds=0.5, pair_interval_seconds=3600)
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: leader_pids(db) == [os.getpid()], "leadership")
        backend = scheduler.lock._conn.info.backend_pid
        # Someone else grabs the lock the moment the leader's session dies.
        with psycopg.connect(libpq_url(db), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
        rival = AdvisoryLock(LEADER_LOCK, db, purpose="rival")
        wait_for(rival.try_acquire, "the rival to get the lock")
        wait_for(lambda: "leadership lost; standing by" in caplog.text, "the old leader to stand down")
        assert not scheduler.lock.held
        rival.release()
        wait_for(lambda: scheduler.lock.held and leader_pids(db) == [os.getpid()], "re-election")
    finally:
        scheduler.stop()
        thread.join(timeout=60)
    assert not thread.is_alive()


def test_unknown_jobs_are_refused():
    with pytest.raises(ValueError, match="unknown jobs"):
        Scheduler(get_settings(), jobs=("poll", "coffee"))


def test_poll_once_cli(stac_collection, add_area, items_by_date, sample_footprint, db):
    for date in ("2020-08-04", "2020-08-29"):
        stac_collection.publish(items_by_date[date])
    add_area("forest", inner_aoi(sample_footprint), collections=[stac_collection.id])
    catalogue = loopback_catalogue(stac_collection.api.url, [stac_collection.id])
    env = {**os.environ, "UNIRS_CATALOGUES": json.dumps([catalogue.model_dump()]), "UNIRS_POLL__LOOKBACK_DAYS": "40"}
    run = subprocess.run([*CLI, "poll", "--once", "--no-dispatch", "--now", "2020-08-30T12:00:00Z"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "items seen: 2\nnew scenes: 2\n" in run.stdout
    assert "analyses created: 1\n" in run.stdout and "quarantined: 0\n" in run.stdout
    again = subprocess.run([*CLI, "poll", "--once", "--no-dispatch", "--now", "2020-08-30T12:00:00Z"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "new scenes: 0\n" in again.stdout and "analyses created: 0\n" in again.stdout

    # An unreachable catalogue: exit status 1 and the reason on stderr.
    bad = loopback_catalogue("http://127.0.0.1:9", [stac_collection.id])
    env["UNIRS_CATALOGUES"] = json.dumps([bad.model_dump()])
    env["UNIRS_POLL__MAX_RETRIES"] = "0"
    failed = subprocess.run([*CLI, "poll", "--once", "--no-dispatch"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert failed.returncode == 1 and "cannot open http://127.0.0.1:9" in failed.stderr


def test_backfill_cli(stac_api, add_area, sample_footprint, db):
    add_area("forest", inner_aoi(sample_footprint), max_cloud_cover=100.0)
    catalogue = loopback_catalogue(stac_api.url, ["sentinel-2-l2a"])
    env = {**os.environ, "UNIRS_CATALOGUES": json.dumps([catalogue.model_dump()])}
    run = subprocess.run([*CLI, "backfill", "forest", "--since", "2019-06-01", "--until", "2020-12-31"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    # 2019-06-16 .. 2020-09-18: 8 acquisitions, 6 clear over the area; the first has no earlier one here.
    assert "items seen: 8\nnew scenes: 8\n" in run.stdout
    assert "analyses created: 5\n" in run.stdout
    assert "pairing" in run.stderr and "item" in run.stderr  # tqdm bars
    missing = subprocess.run([*CLI, "backfill", "nowhere", "--since", "2019-06-01"], env=env, capture_output=True,
                             text=True, timeout=600)
    assert missing.returncode == 1 and "no area named" in missing.stderr


def test_every_lazy_import_of_the_jobs_is_imported_before_the_pool_starts():
    """The jobs import lazily; the leader imports those modules once before its threads start (four jobs
    importing the same packages at once met in importlib's module locks: _DeadlockError)."""
    import ast

    from monitor import dispatch, scheduler

    lazy = set()
    for module in (scheduler, dispatch):
        tree = ast.parse(Path(module.__file__).read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and node.level == 0:
                        lazy.add(node.module)
                    elif isinstance(node, ast.Import):
                        lazy.update(alias.name for alias in node.names)
    assert {"monitor.pairing", "monitor.catalogues.late", "kombu"} <= lazy
    assert lazy <= set(scheduler.JOB_MODULES)
    scheduler._import_job_modules()
    assert all(name in sys.modules for name in scheduler.JOB_MODULES)
