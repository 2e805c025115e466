"""Session fixtures for a real local STAC API and COG server (pytest plugin module).

Register once in tests/conftest.py with ``pytest_plugins = ["tests.fixtures_stac"]``. Then any test
can ask for:

- ``sample_data_dir``: ``data/sentinel2-romania`` (committed COGs + Earth Search shaped items);
- ``sample_items``: the curated Item dicts as committed (relative hrefs);
- ``stac_db_dsn``: libpq DSN of a throw-away database ``unirs_test_stac_<hex>`` with pgstac migrated,
  context on and typed queryables (dropped at the end of the session);
- ``cog_server``: a :class:`devtools.localstac.CogServer` serving ``sample_data_dir`` on 127.0.0.1
  (Range requests, ``.stats()`` byte counters, JSON-lines access log at ``.access_log``);
- ``stac_api``: a :class:`devtools.localstac.StacApiServer` (stac-fastapi-pgstac subprocess, transactions
  enabled) over ``stac_db_dsn`` with the sample collection and items loaded, asset hrefs pointing at
  ``cog_server``. Tests that publish items must delete them again (the fixture is shared).

PostgreSQL comes from ``UNIRS_TEST_ADMIN_URL`` (default ``postgresql://unirs:unirs@127.0.0.1:5432/postgres``,
the same variable tests/conftest.py uses); the role must be a superuser (pgstac creates extensions).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools import dbadmin, localstac

ADMIN_URL = os.environ.get("UNIRS_TEST_ADMIN_URL", "postgresql://unirs:unirs@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    path = localstac.SAMPLE_DATA_DIR
    if not (path / "collection.json").exists():
        pytest.fail(f"{path} has no collection.json: run scripts/build-sample-data")
    return path


@pytest.fixture(scope="session")
def sample_items(sample_data_dir: Path) -> list[dict[str, Any]]:
    return localstac.read_sample_items(sample_data_dir)


@pytest.fixture(scope="session")
def stac_db_dsn() -> Iterator[str]:
    from psycopg.conninfo import make_conninfo

    dsn = make_conninfo(ADMIN_URL, dbname=f"unirs_test_stac_{uuid.uuid4().hex[:8]}")
    localstac.prepare_database(dsn)
    try:
        yield dsn
    finally:
        dbadmin.drop_database(dsn)


@pytest.fixture(scope="session")
def cog_server(sample_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[localstac.CogServer]:
    access_log = tmp_path_factory.mktemp("cog-server") / "access.jsonl"
    with localstac.CogServer(sample_data_dir, access_log=access_log) as server:
        yield server


@pytest.fixture(scope="session")
def stac_api(stac_db_dsn: str, cog_server: localstac.CogServer,
             sample_data_dir: Path) -> Iterator[localstac.StacApiServer]:
    localstac.load_sample_data(stac_db_dsn, cog_server.url, sample_data_dir)
    with localstac.StacApiServer(stac_db_dsn, asset_base_url=cog_server.url) as api:
        yield api
