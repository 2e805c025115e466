"""Prometheus metrics read from the real PostGIS state, the no-clear-scene alarm, and `unirs-monitor metrics`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from core.config import Settings, get_settings
from core.db import session_scope
from core.models import AreaStatus, Delivery, DeliveryStatus, PollState, QuarantinedItem
from devtools.localstac import free_port
from monitor.cli import cli
from monitor.metrics import StateCollector, areas_without_clear_scene, exposition
from monitor.scheduler import check_health
from tests import factories as f

CLI = [str(Path(sys.executable).with_name("unirs-monitor"))]
NOW = datetime.now(UTC)
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} of an exposition text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def populate(db_url: str) -> str:
    """Three active areas (stale, fresh, brand new without scenes), one paused; work in every state."""
    with session_scope(db_url) as s:
        stale = f.area(s, name="stale")
        fresh = f.area(s, name="fresh")
        f.area(s, name="new")  # no scene yet, created now: not flagged
        paused = f.area(s, name="paused", status=AreaStatus.PAUSED)
        cat = f.catalogue(s)
        old = f.scene(s, cat, NOW - timedelta(days=30))
        yesterday = f.scene(s, cat, NOW - timedelta(days=1))
        cloudy = f.scene(s, cat, NOW - timedelta(hours=5), collection="landsat-c2-l2")
        f.observe(s, stale, old, 0.95)
        f.observe(s, stale, cloudy, 0.1)  # newer but cloudy: does not count
        f.observe(s, fresh, yesterday, 0.9)
        f.observe(s, paused, old, 0.9)
        done1 = f.analysis(s, fresh, yesterday, old, stats={"chips_kept_off_model": 9, "chips_sent_to_model": 3})
        f.analysis(s, stale, old, None, stats={"chips_kept_off_model": None, "chips_sent_to_model": 0})
        f.analysis(s, fresh, old, None, status="done", stats={"chips_kept_off_model": 2, "chips_sent_to_model": 1})
        pending = f.analysis(s, stale, cloudy, old, status="pending", stats={})
        pending.created_at = NOW - timedelta(hours=2)
        f.analysis(s, fresh, cloudy, yesterday, status="queued", stats={})
        f.analysis(s, paused, cloudy, old, status="failed", stats={}, last_error="boom")
        for i, status in enumerate(["sent", "sent", "failed", "pending"]):
            s.add(Delivery(delivery_key=f"analysis:{done1.id}", analysis_id=done1.id, recipient=f"r{i}@example.org",
                           status=DeliveryStatus(status), message_id=f"<{i}@unirs>"))
        s.add(QuarantinedItem(catalogue_id=cat.id, collection="sentinel-2-l2a", item_id="bad", reason="no geometry"))
        s.add(PollState(catalogue_id=cat.id, collection="sentinel-2-l2a", last_success_at=NOW - timedelta(minutes=7)))
        return cat.name


def test_metrics_from_the_database_state(db):
    cat = populate(db)
    # The rows are stamped relative to NOW (import time); the scrape reads the clock, so ages grow by
    # however long the suite ran before this test. Bound them by the clock read around the scrape.
    before = (datetime.now(UTC) - NOW).total_seconds()
    got = samples(exposition(get_settings()).decode())
    after = (datetime.now(UTC) - NOW).total_seconds()

    def age(seconds: float) -> tuple[float, float]:
        return seconds + before - 1, seconds + after + 1

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert value("unirs_metrics_scrape_error") == 0
    assert value("unirs_scenes_total", catalogue=cat, collection="sentinel-2-l2a") == 2
    assert value("unirs_scenes_total", catalogue=cat, collection="landsat-c2-l2") == 1
    assert value("unirs_quarantined_items_total", catalogue=cat) == 1
    assert {st: value("unirs_observations", status=st) for st in ("clear", "cloudy", "failed", "pending")} == {
        "clear": 3, "cloudy": 1, "failed": 0, "pending": 0}
    assert {st: value("unirs_analyses", status=st) for st in
            ("pending", "queued", "running", "done", "skipped", "failed")} == {
        "pending": 1, "queued": 1, "running": 0, "done": 3, "skipped": 0, "failed": 1}
    low, high = age(2 * 3600)
    assert low <= value("unirs_queue_lag_seconds") <= high
    assert {st: value("unirs_emails", status=st) for st in ("pending", "sending", "sent", "failed")} == {
        "pending": 1, "sending": 0, "sent": 2, "failed": 1}
    assert value("unirs_chips_kept_off_model_total") == 11
    assert value("unirs_chips_sent_to_model_total") == 4
    flags = {k[1][0][1]: v for k, v in got.items() if k[0] == "unirs_areas_without_clear_scene"}
    assert flags == {"stale": 1, "fresh": 0, "new": 0}  # paused areas are not watched
    low, high = age(30 * 86400)
    assert low <= value("unirs_seconds_since_last_clear_scene", area="stale") <= high
    low, high = age(86400)
    assert low <= value("unirs_seconds_since_last_clear_scene", area="fresh") <= high
    assert value("unirs_seconds_since_last_clear_scene", area="new") < 600
    assert value("unirs_last_successful_poll_timestamp_seconds", catalogue=cat,
                 collection="sentinel-2-l2a") == pytest.approx((NOW - timedelta(minutes=7)).timestamp())


def test_alarm_function_and_once_a_day_warning(db, caplog):
    populate(db)
    with session_scope(db) as s:
        stale = areas_without_clear_scene(s, 14)
        assert [name for name, _ in stale] == ["stale"]
        assert abs((stale[0][1] - (NOW - timedelta(days=30))).total_seconds()) < 1
        # A brand-new area without any scene is flagged once it is older than the limit.
        assert areas_without_clear_scene(s, 14, now=NOW + timedelta(days=15))[1] == ("new", None)
    caplog.set_level(logging.WARNING, logger="monitor.scheduler")
    warned: dict = {}
    day = NOW.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    assert check_health(get_settings(), now=day, warned=warned) == ["stale"]
    assert check_health(get_settings(), now=day + timedelta(hours=23), warned=warned) == []  # hourly job, same day
    assert check_health(get_settings(), now=day + timedelta(days=1), warned=warned) == ["stale"]
    assert "area 'stale' has had no clear scene for more than 14 days" in caplog.text


def test_a_scrape_never_raises():
    bad = Settings(database_url="postgresql+psycopg://unirs:unirs@127.0.0.1:5432/unirs_no_such_database")
    got = samples(exposition(bad).decode())
    assert got[("unirs_metrics_scrape_error", ())] == 1
    assert not any(name.startswith("unirs_analyses") for name, _ in got)
    names = [family.name for family in StateCollector(bad).collect()]
    assert names == ["unirs_metrics_scrape_error", "unirs_metrics_scrape_duration_seconds"]


def test_metrics_cli_prints_exposition_text(db):
    populate(db)
    result = CliRunner().invoke(cli, ["metrics"], catch_exceptions=False)
    assert result.exit_code == 0
    got = samples(result.output)
    assert got[("unirs_metrics_scrape_error", ())] == 0
    assert got[("unirs_analyses", (("status", "done"),))] == 3


def scrape_when_up(proc: subprocess.Popen, port: int, deadline_seconds: float = 60.0) -> dict:
    """GET /metrics until the process answers (the deadline only stops a hung test); parsed samples."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        assert proc.poll() is None, "the process exited before serving metrics"
        assert time.monotonic() < deadline, "metrics server never answered"
        try:
            with NO_PROXY.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                assert resp.status == 200
                return samples(resp.read().decode())
        except OSError:
            time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_metrics_cli_serves_http(db):
    populate(db)
    port = free_port()
    proc = subprocess.Popen([*CLI, "metrics", "--serve", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        got = scrape_when_up(proc, port)
    finally:
        stop(proc)
    assert got[("unirs_metrics_scrape_error", ())] == 0
    assert got[("unirs_emails", (("status", "sent"),))] == 2


def test_scheduler_serves_metrics_and_warns_about_stale_areas(db, tmp_path):
    populate(db)
    port = free_port()
    log = tmp_path / "scheduler.log"
    env = {**os.environ, "UNIRS_CATALOGUES": "[]", "UNIRS_METRICS_PORT": str(port), "UNIRS_LOG_LEVEL": "INFO"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([*CLI, "scheduler", "--jobs", "health", "--retry-seconds", "1"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        got = scrape_when_up(proc, port)
        deadline = time.monotonic() + 60
        while "has had no clear scene" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        stop(proc)
    assert got[("unirs_areas_without_clear_scene", (("area", "stale"),))] == 1
    text = log.read_text()
    assert "WARNING" in text and "area 'stale' has had no clear scene for more than 14 days" in text
    assert "'fresh'" not in text
