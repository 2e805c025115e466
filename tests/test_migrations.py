"""The Alembic revisions build the schema from nothing, tear it down and build it again."""

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from geoalchemy2 import alembic_helpers
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

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


INDEX_0015 = "ix_findings_observed_text_trgm"


def _index(url: str, name: str) -> tuple[bool, str] | None:
    """(valid, definition) of index ``name``, None when it does not exist."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
            (name,)).fetchone()


def test_0015_builds_concurrently_replaces_an_interrupted_build_and_downgrades():
    url = create_database("unirs_test_mig")
    try:
        sa_url = sqlalchemy_url(url)
        migrate.upgrade(sa_url, "0014")
        with psycopg.connect(url, autocommit=True) as conn:
            # An interrupted CONCURRENTLY build under the same name: the build fails on the one row of
            # catalogues (division by zero) and leaves an INVALID index behind, as a killed `db upgrade` would.
            conn.execute("INSERT INTO catalogues (id, name, url) VALUES (1, 'c', 'https://example.org')")
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute(f"CREATE INDEX CONCURRENTLY {INDEX_0015} ON catalogues ((1 / (id - 1)))")
        assert _index(url, INDEX_0015)[0] is False
        statements: list[tuple[str, bool]] = []

        def capture(conn, cursor, statement, parameters, context, executemany):
            statements.append((" ".join(statement.split()), cursor.connection.autocommit))

        event.listen(Engine, "before_cursor_execute", capture)
        try:
            migrate.upgrade(sa_url, "0015")
        finally:
            event.remove(Engine, "before_cursor_execute", capture)
        # Outside the migration's transaction, so writers of findings are not locked out for the build.
        assert [level for s, level in statements if s.startswith("CREATE INDEX")] == [True]
        assert [s.split(" ON ")[0] for s, _ in statements if s.startswith(("CREATE INDEX", "DROP INDEX"))] == [
            f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX_0015}", f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX_0015}"]
        valid, definition = _index(url, INDEX_0015)
        assert valid is True
        assert definition.startswith(f"CREATE INDEX {INDEX_0015} ON public.findings USING gist (observed_at, ")
        assert "gist_trgm_ops" in definition
        # alembic_version still moved on after the autocommit block.
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0015",)
        migrate.downgrade(sa_url, "0014")
        assert _index(url, INDEX_0015) is None
        # A second upgrade over an index that already exists (IF NOT EXISTS): a re-run after a crash that
        # left the index built but alembic_version behind.
        migrate.upgrade(sa_url, "0015")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE alembic_version SET version_num = '0014'")
        migrate.upgrade(sa_url, "0015")
        assert _index(url, INDEX_0015)[0] is True
    finally:
        drop_database(url)
