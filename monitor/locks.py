"""PostgreSQL advisory locks: one scheduler leader across processes and hosts, one work cycle at a time.

Session-level advisory locks belong to a database connection: when the holder's process dies its
connection closes and PostgreSQL releases the lock — no lease to expire, no stale lock file. The
connection is dedicated (not from the SQLAlchemy pool, which could hand it to someone else or recycle
it) and uses TCP keepalives so a vanished host is noticed by the server too.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy.engine import make_url

from core.locks import lock_key  # the keys live in core: the workers take per-area locks too

logger = logging.getLogger(__name__)

LEADER_LOCK = "unirs-monitor:scheduler-leader"
CYCLE_LOCK = "unirs-monitor:poll-cycle"
PAIR_LOCK = "unirs-monitor:pairing"


def libpq_url(database_url: str) -> str:
    """The SQLAlchemy URL of the settings as a libpq URL psycopg understands."""
    url = make_url(database_url)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _connect(database_url: str, purpose: str) -> psycopg.Connection:
    return psycopg.connect(
        libpq_url(database_url),
        autocommit=True,
        application_name=f"unirs-monitor {purpose} pid={os.getpid()} host={socket.gethostname()}"[:63],
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
        connect_timeout=10,
    )


class AdvisoryLock:
    """A session-level advisory lock held on its own connection for as long as the holder wants it."""

    def __init__(self, name: str, database_url: str, purpose: str = "lock"):
        self.name = name
        self.key = lock_key(name)
        self.database_url = database_url
        self.purpose = purpose
        self._conn: psycopg.Connection | None = None

    @property
    def held(self) -> bool:
        return self._conn is not None

    def try_acquire(self) -> bool:
        """Take the lock if free; never waits. Connection errors count as "not acquired"."""
        if self._conn is not None:
            return True
        try:
            conn = _connect(self.database_url, self.purpose)
        except psycopg.Error as exc:
            logger.warning("cannot reach the database for lock %s: %s", self.name, exc)
            return False
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()[0]
        except psycopg.Error as exc:
            logger.warning("advisory lock %s: %s", self.name, exc)
            conn.close()
            return False
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def acquire(self) -> None:
        """Wait for the lock (blocking ``pg_advisory_lock``)."""
        if self._conn is not None:
            return
        conn = _connect(self.database_url, self.purpose)
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def still_held(self) -> bool:
        """True while our connection is alive and still owns the lock (checked by the leader's watchdog)."""
        if self._conn is None:
            return False
        try:
            row = self._conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid() "
                "AND classid = ((%s::bigint >> 32) & 4294967295)::oid AND objid = (%s::bigint & 4294967295)::oid "
                "AND objsubid = 1",
                (self.key, self.key),
            ).fetchone()
        except psycopg.Error as exc:
            logger.error("lost the database connection holding %s: %s", self.name, exc)
            self.release()
            return False
        return bool(row and row[0])

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()  # closing the session releases every advisory lock it held
            except psycopg.Error:
                pass


def wait_for_leadership(lock: AdvisoryLock, retry_seconds: float, should_stop=lambda: False) -> bool:
    """Retry ``lock`` every ``retry_seconds`` until it is ours (True) or ``should_stop()`` (False)."""
    announced = False
    while not should_stop():
        if lock.try_acquire():
            return True
        if not announced:
            logger.info("another scheduler is the leader; standing by (retrying every %.0f s)", retry_seconds)
            announced = True
        deadline = time.monotonic() + retry_seconds
        while time.monotonic() < deadline and not should_stop():
            time.sleep(min(0.5, retry_seconds))
    return False


@contextmanager
def cycle_lock(database_url: str, name: str = CYCLE_LOCK) -> Iterator[None]:
    """Serialise poll cycles (``name`` :data:`CYCLE_LOCK`) or pairing runs (:data:`PAIR_LOCK`) across
    processes (the scheduler's jobs and a cron ``poll --once``)."""
    lock = AdvisoryLock(name, database_url, purpose=name.rsplit(":", 1)[-1])
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def try_cycle_lock(database_url: str, name: str) -> Iterator[bool]:
    """Like :func:`cycle_lock` but never waits: yields True while holding ``name``, False when another
    process holds it (or the database cannot be reached) — for jobs that should skip, not queue up."""
    lock = AdvisoryLock(name, database_url, purpose=name.rsplit(":", 1)[-1])
    got = lock.try_acquire()
    try:
        yield got
    finally:
        if got:
            lock.release()
