"""The Alembic revisions build the schema from nothing, tear it down and build it again."""

import psycopg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from geoalchemy2 import alembic_helpers
from sqlalchemy import create_engine

from core import migrate
from core.models import Base
from devtools.dbadmin import sqlalchemy_url
from tests.conftest import create_database, drop_database


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {r[0] for r in rows} - {"spatial_ref_sys"}


def _drift(sa_url: str) -> list:
    """Differences between the migrated database and the ORM models (empty = no drift)."""
    engine = create_engine(sa_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "include_object": alembic_helpers.include_object}
            )
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_round_trip():
    url = create_database("unirs_test_mig")
    try:
        sa_url = sqlalchemy_url(url)
        expected = set(Base.metadata.tables) | {"alembic_version"}
        migrate.upgrade(sa_url)
        assert _tables(url) == expected
        migrate.downgrade(sa_url, "base")
        assert _tables(url) == {"alembic_version"}
        migrate.upgrade(sa_url)
        assert _tables(url) == expected
        assert _drift(sa_url) == []
    finally:
        drop_database(url)
