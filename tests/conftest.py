"""Shared fixtures: a throw-away PostGIS database per test session, migrated with the real Alembic
revisions, and the settings pointed at it (subprocesses started by tests inherit the environment)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest

from core import migrate
from core.config import get_settings
from core.db import reset_engines
from devtools import dbadmin

pytest_plugins = ["tests.fixtures_stac", "tests.fixtures_ingest", "tests.fixtures_workers", "tests.fixtures_web",
                  "tests.fixtures_reports", "tests.fixtures_mail"]

ADMIN_URL = os.environ.get("UNIRS_TEST_ADMIN_URL", "postgresql://unirs:unirs@127.0.0.1:5432/postgres")


def create_database(prefix: str) -> str:
    """An empty uniquely named database with PostGIS; returns its libpq DSN."""
    return dbadmin.create_scratch_database(ADMIN_URL, prefix)


drop_database = dbadmin.drop_database


@pytest.fixture(scope="session", autouse=True)
def _single_torch_thread() -> Iterator[None]:
    """Tiny test models gain nothing from intra-op threads; on a shared 2-core machine the OpenMP threads
    of concurrent processes spin against each other (10× slowdowns). One thread also makes bit-exact
    comparisons (training resume) independent of the machine's core count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
    url = dbadmin.sqlalchemy_url(libpq)
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
    "finding_images, findings, deliveries, digests, analyses, observations, quarantined_items, scenes, acquisitions, "
    "poll_states, catalogues, areas"
)


@pytest.fixture
def db(database_url: str) -> Iterator[str]:
    """The session database, emptied before the test (tests that use it start from nothing)."""
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {APP_TABLES} RESTART IDENTITY CASCADE")
    yield database_url
