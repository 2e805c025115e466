"""Settings are built once at the entry point and handed down: two configurations (two databases, two
outboxes) in one process, and every function writes to the database of the settings it was given."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from core import migrate
from core.config import Settings, SmtpSettings, get_settings
from core.db import reset_engines, session_scope
from core.models import Catalogue, Observation, ObservationStatus
from devtools import dbadmin
from monitor.cli import cli
from monitor.dispatch import dispatch_once
from monitor.pairing import process_pending
from monitor.reports import run_deliveries
from tests import factories as f
from tests.conftest import create_database, drop_database


@pytest.fixture
def second_database(db: str) -> Iterator[str]:
    """A second freshly migrated database next to the session one (both empty at the start)."""
    libpq = create_database("unirs_test_b")
    url = dbadmin.sqlalchemy_url(libpq)
    migrate.upgrade(url)
    yield url
    reset_engines()  # close the pooled connections to it before dropping it
    drop_database(libpq)


def rows(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def configured(url: str, outbox: Path) -> Settings:
    # No catalogue is configured: a pending observation is settled as "failed" without any COG read.
    return Settings(database_url=url, smtp=SmtpSettings(outbox_dir=outbox), catalogues=[])


def seed(url: str, name: str, recipient: str) -> tuple[int, int]:
    """A done analysis with findings, a pending analysis and a pending observation; returns their ids."""
    with session_scope(url) as s:
        done = f.world(s, name=name, recipients=[recipient])
        pending = f.analysis(s, done.area, done.after_scene, done.before_scene, status="pending",
                             analyser="spectral@1")
        late = f.scene(s, s.get(Catalogue, done.after_scene.catalogue_id), datetime(2020, 9, 3, 9, 40, tzinfo=UTC))
        s.add(Observation(area_id=done.area_id, acquisition_id=late.acquisition_id, scene_id=late.id,
                          status=ObservationStatus.PENDING))
        return pending.id, late.id


def test_each_function_writes_to_the_database_of_its_settings(db, second_database, tmp_path):
    a = configured(db, tmp_path / "outbox-a")
    b = configured(second_database, tmp_path / "outbox-b")
    pending_a, late_a = seed(db, "Apuseni forest", "ana@a.example.org")
    pending_b, late_b = seed(second_database, "Retezat forest", "bob@b.example.org")

    # Reports: B's run queues and writes B's alert only; A's ledger and outbox stay empty.
    counts = run_deliveries(b)
    assert (counts["alerts_queued"], counts["sent"]) == (1, 1)
    assert rows(second_database, "SELECT recipient, status FROM deliveries") == [("bob@b.example.org", "sent")]
    assert rows(db, "SELECT recipient FROM deliveries") == []
    assert len(list((tmp_path / "outbox-b").glob("*.eml"))) == 1
    assert list((tmp_path / "outbox-a").glob("*.eml")) == []

    # Dispatch: A's pending analysis is queued and published; B's stays pending.
    sent: list[tuple[int, str]] = []
    assert dispatch_once(a, send=lambda analysis_id, queue: sent.append((analysis_id, queue)))["queued"] == 1
    assert sent == [(pending_a, "cpu")]
    assert rows(db, f"SELECT status::text FROM analyses WHERE id = {pending_a}") == [("queued",)]
    assert rows(second_database, f"SELECT status::text FROM analyses WHERE id = {pending_b}") == [("pending",)]

    # Pairing: B's pending observation is settled in B (its catalogue is not configured there); A's is not.
    stats = process_pending(b)
    assert (stats.observations, stats.failed) == (1, 1)
    ((status, reason),) = rows(second_database,
                               f"SELECT status::text, reason FROM observations WHERE scene_id = {late_b}")
    assert status == "failed" and "is no longer configured" in reason
    assert rows(db, f"SELECT status::text FROM observations WHERE scene_id = {late_a}") == [("pending",)]

    # And the other way round, in the same process: A's reports go to A.
    assert run_deliveries(a)["sent"] == 1
    assert rows(db, "SELECT recipient FROM deliveries") == [("ana@a.example.org",)]
    assert rows(second_database, "SELECT count(*) FROM deliveries") == [(1,)]


def test_the_cli_hands_its_settings_to_the_command(db, second_database, monkeypatch):
    """`unirs-monitor` reads the settings once (here: UNIRS_DATABASE_URL = B) and its commands use them."""
    monkeypatch.setenv("UNIRS_DATABASE_URL", second_database)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["areas", "add", "POLYGON((23.1 46.5, 23.2 46.5, 23.2 46.6, 23.1 46.5))",
                                          "--name", "only-in-b"], catch_exceptions=False)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert rows(second_database, "SELECT name FROM areas") == [("only-in-b",)]
    assert rows(db, "SELECT name FROM areas") == []


def test_a_session_needs_to_be_told_its_database():
    with pytest.raises(TypeError, match="needs the caller's Settings or a database URL"), session_scope(None):
        pass
