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


INDEX_0021 = "ix_findings_first_finding"


def _fill_findings(url: str) -> None:
    """One area with 40,000 region findings (400 analyses of 100), 1 % of them re-detections, ANALYZEd:
    the shape of a monitored area after a few years, where the planner's choice of index shows."""
    with psycopg.connect(url, autocommit=True) as conn:
        # Foreign keys off for the fill: only findings and their area matter to the alert rule's plan.
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "INSERT INTO areas (id, name, owner_id, geom, area_km2, status, collections, max_cloud_cover, "
            "min_clear_fraction, recipients, questions, alert_frequency, min_alert_hectares, pairing_policy, "
            "properties) VALUES (1, 'a', 1, ST_Multi(ST_MakeEnvelope(0, 0, 1, 1, 4326)), 1, 'active', "
            "'{sentinel-2-l2a}', 60, 0.5, '{}', '{}', 'immediate', 0, 'latest', '{}')")
        conn.execute(
            "INSERT INTO findings (id, analysis_id, area_id, ordinal, kind, change_class, statistics, "
            "analyser_name, analyser_version, observed_at, first_finding_id) "
            "SELECT n, 1 + n / 100, 1, n % 100, 'region', 'vegetation_loss', '{}', 'x', '1', "
            "timestamptz '2020-01-01' + n * interval '1 hour', CASE WHEN n % 100 = 7 THEN n - 50 END "
            "FROM generate_series(1, 40000) AS n")
        conn.execute("ANALYZE findings")
        conn.execute("ANALYZE areas")


def _alert_rule_plan(sa_url: str) -> str:
    """EXPLAIN of the alert rule's query for one analysis (monitor.reports.immediate.alerting_region_ids)."""
    from sqlalchemy import select, text
    from sqlalchemy.dialects import postgresql

    from core.models import Area, Finding
    from monitor.reports.immediate import region_alerts_sql

    query = (select(Finding.id).join(Area, Area.id == Finding.area_id)
             .where(Finding.analysis_id == 200, Finding.kind == "region", region_alerts_sql()))
    sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    engine = create_engine(sa_url)
    try:
        with engine.connect() as conn:
            return "\n".join(r[0] for r in conn.execute(text("EXPLAIN " + sql)))
    finally:
        engine.dispose()


def test_0021_indexes_first_finding_id_for_the_alert_rule_and_reruns():
    url = create_database("unirs_test_mig")
    try:
        sa_url = sqlalchemy_url(url)
        migrate.upgrade(sa_url, "0020")
        assert _index(url, INDEX_0021) is None
        _fill_findings(url)
        assert INDEX_0021 not in _alert_rule_plan(sa_url)
        migrate.upgrade(sa_url, "0021")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE findings")
        valid, definition = _index(url, INDEX_0021)
        assert valid is True
        assert definition == (f"CREATE INDEX {INDEX_0021} ON public.findings USING btree (first_finding_id) "
                              "WHERE (first_finding_id IS NOT NULL)")
        plan = _alert_rule_plan(sa_url)
        assert INDEX_0021 in plan, plan
        # Re-run over the built index (alembic_version left behind by a crash): no error, still valid.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE alembic_version SET version_num = '0020'")
        migrate.upgrade(sa_url)
        assert _index(url, INDEX_0021)[0] is True
        migrate.upgrade(sa_url)  # already at head: nothing to do
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0021",)
        migrate.downgrade(sa_url, "0020")
        assert _index(url, INDEX_0021) is None
    finally:
        drop_database(url)
