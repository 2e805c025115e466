"""Shared fixtures: a throw-away PostGIS database per test session, migrated with the real Alembic
revisions, and the settings pointed at it (subprocesses started by tests inherit the environment)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from monitor import migrate
from monitor.config import get_settings
from monitor.db import reset_engines

pytest_plugins = ["tests.fixtures_stac", "tests.fixtures_ingest", "tests.fixtures_workers"]

ADMIN_URL = os.environ.get("UNIRS_TEST_ADMIN_URL", "postgresql://unirs:unirs@127.0.0.1:5432/postgres")


def _sqlalchemy_url(libpq_url: str) -> str:
    return libpq_url.replace("postgresql://", "postgresql+psycopg://", 1)


def create_database(prefix: str) -> str:
    """Create an empty database with PostGIS; return its libpq URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    return url


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session", autouse=True)
def _test_outbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Emails written by any test (or a worker it starts) land in a temporary outbox, not in var/."""
    os.environ["UNIRS_SMTP__OUTBOX_DIR"] = str(tmp_path_factory.mktemp("outbox"))
    get_settings.cache_clear()
    yield
    os.environ.pop("UNIRS_SMTP__OUTBOX_DIR", None)
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """SQLAlchemy URL of a freshly migrated database, exported as UNIRS_DATABASE_URL."""
    libpq = create_database("unirs_test")
    url = _sqlalchemy_url(libpq)
    migrate.upgrade(url)
    old = os.environ.get("UNIRS_DATABASE_URL")
    os.environ["UNIRS_DATABASE_URL"] = url
    get_settings.cache_clear()
    reset_engines()
    yield url
    reset_engines()
    if old is None:
        os.environ.pop("UNIRS_DATABASE_URL", None)
    else:
        os.environ["UNIRS_DATABASE_URL"] = old
    get_settings.cache_clear()
    drop_database(libpq)


APP_TABLES = (
    "finding_images, findings, deliveries, digests, analyses, observations, quarantined_items, scenes, "
    "poll_states, catalogues, areas"
)


@pytest.fixture
def db(database_url: str) -> Iterator[str]:
    """The session database, emptied before the test (tests that use it start from nothing)."""
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {APP_TABLES} RESTART IDENTITY CASCADE")
    yield database_url
