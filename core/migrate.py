"""Apply Alembic migrations from code (the CLI's `db upgrade`, tests, the demo)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


def alembic_config(url: str | None = None) -> Config:
    if not ALEMBIC_INI.is_file():
        raise FileNotFoundError(f"alembic.ini not found at {ALEMBIC_INI}; run from a source checkout")
    cfg = Config(str(ALEMBIC_INI))
    cfg.attributes["configure_logger"] = False
    if url:
        cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> None:
    command.current(alembic_config(url), verbose=False)


class SchemaError(RuntimeError):
    """The database schema is missing or behind the code; the message says which command fixes it."""


def revisions(url: str) -> tuple[str | None, str]:
    """(revision the database is at — None for an empty database —, head revision of this code)."""
    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    from core.db import get_engine

    # Read alembic_version directly: MigrationContext would log its dialect chatter on every command.
    with get_engine(url).connect() as conn:
        exists = conn.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL")).scalar()
        current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar() if exists else None
    return current, ScriptDirectory.from_config(alembic_config()).get_current_head()


def require_current(url: str) -> None:
    """Raise :class:`SchemaError` unless the database is at the head revision."""
    current, head = revisions(url)
    if current is None:
        raise SchemaError(f"the database has no UniRS schema yet (code expects revision {head}): "
                          "run `unirs-monitor db upgrade` once")
    if current != head:
        raise SchemaError(f"the database schema is at revision {current}, the code expects {head}: "
                          "run `unirs-monitor db upgrade`")
