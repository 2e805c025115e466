"""The one engine / session factory. Every module gets sessions from :func:`session_scope`.

``session_scope(settings)`` always names its database: functions are handed the ``Settings`` built at the
entry point and pass them on, so a process can hold two configurations (tests do) and a database URL is
never read from the environment behind the caller's back. One engine (pool) per database URL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings

_lock = threading.Lock()
_factories: dict[str, sessionmaker[Session]] = {}


#: The settings of the caller, or a SQLAlchemy database URL (migrations, tests).
Target = Settings | str


def get_engine(target: Target) -> Engine:
    return _factory(target).kw["bind"]


def _url(target: Target) -> str:
    if isinstance(target, Settings):
        return target.database_url
    if isinstance(target, str) and target:
        return target
    raise TypeError(f"session_scope() needs the caller's Settings or a database URL, got {target!r}")


def _factory(target: Target) -> sessionmaker[Session]:
    url = _url(target)
    with _lock:
        if url not in _factories:
            engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
            _factories[url] = sessionmaker(bind=engine, expire_on_commit=False)
        return _factories[url]


@contextmanager
def session_scope(target: Target) -> Iterator[Session]:
    """A transaction on ``target``'s database (its Settings, or a URL): commit on success, roll back on any
    exception. Raises TypeError when no target is given (there is no implicit process-wide database)."""
    session = _factory(target)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def reset_engines() -> None:
    """Drop pooled connections (tests switch databases; a forked worker must not reuse its parent's sockets)."""
    with _lock:
        for factory in _factories.values():
            factory.kw["bind"].dispose(close=False)
        _factories.clear()
