"""The one engine / session factory. Every module gets sessions from :func:`session_scope`.

Functions that are handed ``settings`` pass them on (``session_scope(settings)``), so a process can hold two
configurations (tests do) and a database URL is never read from the environment behind the caller's back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings, get_settings

_lock = threading.Lock()
_factories: dict[str, sessionmaker[Session]] = {}


Target = Settings | str | None


def get_engine(target: Target = None) -> Engine:
    return _factory(target).kw["bind"]


def _url(target: Target) -> str:
    if isinstance(target, Settings):
        return target.database_url
    return target or get_settings().database_url


def _factory(target: Target) -> sessionmaker[Session]:
    url = _url(target)
    with _lock:
        if url not in _factories:
            engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
            _factories[url] = sessionmaker(bind=engine, expire_on_commit=False)
        return _factories[url]


@contextmanager
def session_scope(target: Target = None) -> Iterator[Session]:
    """A transaction on ``target`` (settings, a URL, or None for the process settings): commit on success,
    roll back on any exception."""
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
