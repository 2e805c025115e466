"""The one engine / session factory. Every module gets sessions from :func:`session_scope`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from monitor.config import get_settings

_lock = threading.Lock()
_factories: dict[str, sessionmaker[Session]] = {}


def get_engine(url: str | None = None) -> Engine:
    return _factory(url).kw["bind"]


def _factory(url: str | None) -> sessionmaker[Session]:
    url = url or get_settings().database_url
    with _lock:
        if url not in _factories:
            engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
            _factories[url] = sessionmaker(bind=engine, expire_on_commit=False)
        return _factories[url]


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A transaction: commit on success, roll back on any exception."""
    session = _factory(url)()
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
