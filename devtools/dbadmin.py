"""Creating and dropping PostgreSQL databases (the demo, the test suite and the benchmarks use
throw-away databases; the STAC API gets a dedicated one)."""

from __future__ import annotations

import logging
import uuid

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

log = logging.getLogger(__name__)


def dbname(dsn: str) -> str | None:
    return conninfo_to_dict(dsn).get("dbname")


def with_dbname(dsn: str, name: str) -> str:
    """The same connection parameters, another database (the result is a key=value libpq string)."""
    return make_conninfo(dsn, dbname=name)


def create_database(dsn: str, maintenance_db: str = "postgres", *, postgis: bool = False) -> bool:
    """Create the database named in ``dsn`` if it does not exist; return True if it was created.

    Connects to ``maintenance_db`` with the same credentials (CREATE DATABASE cannot run inside the
    target database, nor in a transaction).
    """
    name = dbname(dsn)
    if not name:
        raise ValueError(f"dsn names no database: {dsn!r}")
    with psycopg.connect(with_dbname(dsn, maintenance_db), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            log.info("created database %s", name)
    if postgis:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    return not exists


def drop_database(dsn: str, maintenance_db: str = "postgres") -> None:
    """Drop the database named in ``dsn`` (FORCE: disconnects leftover sessions). For throw-away DBs."""
    name = dbname(dsn)
    with psycopg.connect(with_dbname(dsn, maintenance_db), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    log.info("dropped database %s", name)


def create_scratch_database(admin_dsn: str, prefix: str) -> str:
    """A new uniquely named database with PostGIS; returns its libpq DSN."""
    dsn = with_dbname(admin_dsn, f"{prefix}_{uuid.uuid4().hex[:8]}")
    create_database(dsn, postgis=True)
    return dsn


def sqlalchemy_url(dsn: str) -> str:
    """SQLAlchemy URL (psycopg 3 driver) for a libpq DSN in either URL or key=value form."""
    from sqlalchemy.engine import URL

    params = conninfo_to_dict(dsn)
    return URL.create(
        "postgresql+psycopg",
        username=params.get("user"),
        password=params.get("password"),
        host=params.get("host"),
        port=int(params["port"]) if params.get("port") else None,
        database=params.get("dbname"),
    ).render_as_string(hide_password=False)
