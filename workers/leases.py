"""The analysis state machine on the worker side: claim, heartbeat, finish — all in the ``analyses`` table.

::

    pending ──dispatch──▶ queued ──claim──▶ running ──▶ done | skipped | failed
                            ▲                 │
                            ├──dispatch───────┤ lease expired (worker lost), attempts < max
                            │                 │          (dispatch marks it failed at max)
                            └─────────────────┘ transient error, attempts < max (re-sent after 2 × lease)

- **claim**: one atomic ``UPDATE … RETURNING``: a row is taken only if it is queued/pending, or running
  with an expired lease, and has attempts left. Two deliveries of one message (Redis visibility timeout,
  a re-queue racing a slow worker) cannot both run it; a row already done/skipped/failed is never touched
  again — that is what makes results exactly-once on top of at-least-once delivery.
- **lease + heartbeat**: the claim sets ``lease_expires_at = now() + lease``; a thread extends it every
  ``min(heartbeat_seconds, lease / 3)``. A worker that dies stops heartbeating, the lease expires and
  :mod:`monitor.dispatch` re-queues the row. Times come from the database clock (``now()``), so worker
  and dispatcher clocks never disagree.
- **fencing**: every later write is guarded by ``worker`` *and* ``attempts`` of this claim. If the lease
  was lost (the row was re-queued and claimed by someone else), the guarded UPDATE matches no row and the
  whole finishing transaction — findings included — is rolled back (:class:`LeaseLost`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from monitor.config import Settings
from monitor.db import session_scope

logger = logging.getLogger(__name__)

# A task that keeps heartbeating longer than this is presumed stuck (a hung read): the heartbeat stops
# extending the lease so the dispatcher can recover the row. Also the Celery hard time limit.
MAX_RUN_SECONDS = 3600
LAST_ERROR_MAX = 4000


class LeaseLost(RuntimeError):
    """This worker no longer holds the analysis (its lease expired and the row moved on)."""


@dataclass(frozen=True)
class Claim:
    analysis_id: int
    attempts: int
    worker: str
    previous_error: str | None = None  # why the last attempt did not finish (kept in the stats of this one)


_CLAIM = text("""
    UPDATE analyses
       SET status = 'running', attempts = attempts + 1, worker = :worker,
           lease_expires_at = now() + make_interval(secs => :lease), heartbeat_at = now(),
           started_at = now(), finished_at = NULL
     WHERE id = :id
       AND attempts < :max_attempts
       AND (status IN ('queued', 'pending') OR (status = 'running' AND lease_expires_at < now()))
 RETURNING attempts, last_error
""")

_STATE = text("SELECT status::text AS status, worker, attempts, lease_expires_at FROM analyses WHERE id = :id")

_HEARTBEAT = text("""
    UPDATE analyses SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => :lease)
     WHERE id = :id AND status = 'running' AND worker = :worker AND attempts = :attempts
""")

_FINISH = text("""
    UPDATE analyses
       SET status = CAST(:status AS analysis_status), finished_at = now(), lease_expires_at = NULL,
           last_error = :last_error, stats = :stats
     WHERE id = :id AND status = 'running' AND worker = :worker AND attempts = :attempts
 RETURNING id
""").bindparams(bindparam("stats", type_=JSONB))

# Transient trouble (database hiccup, network): give the row back while attempts last. It goes back as
# `queued` *without* a message: the dispatcher re-sends rows queued longer than 2 × lease, which is the
# back-off (an outage of the COG host does not burn every attempt within seconds).
_RELEASE = text("""
    UPDATE analyses
       SET status = CASE WHEN attempts >= :max_attempts THEN 'failed'::analysis_status
                         ELSE 'queued'::analysis_status END,
           finished_at = CASE WHEN attempts >= :max_attempts THEN now() END,
           queued_at = now(), lease_expires_at = NULL, last_error = :last_error
     WHERE id = :id AND status = 'running' AND worker = :worker AND attempts = :attempts
 RETURNING status::text
""")


def claim(analysis_id: int, worker: str, settings: Settings) -> Claim | None:
    """Take the analysis for this worker, or None (already taken, finished, or out of attempts)."""
    with session_scope() as session:
        claimed = session.execute(_CLAIM, {
            "id": analysis_id, "worker": worker, "lease": settings.analysis.lease_seconds,
            "max_attempts": settings.analysis.max_attempts,
        }).one_or_none()
        attempts = claimed.attempts if claimed else None
        if attempts is None:
            row = session.execute(_STATE, {"id": analysis_id}).mappings().one_or_none()
    if attempts is None:
        if row is None:
            logger.warning("analysis %s does not exist (deleted?); message dropped", analysis_id)
        else:
            logger.info("analysis %s not claimed: status %s, worker %s, attempts %s, lease until %s — nothing to do",
                        analysis_id, row["status"], row["worker"], row["attempts"], row["lease_expires_at"])
        return None
    logger.info("analysis %s claimed by %s (attempt %d)", analysis_id, worker, attempts)
    return Claim(analysis_id, attempts, worker, claimed.last_error)


def _params(c: Claim) -> dict[str, Any]:
    return {"id": c.analysis_id, "worker": c.worker, "attempts": c.attempts}


def finish(session: Session, c: Claim, status: str, *, stats: dict[str, Any], last_error: str | None = None) -> None:
    """Move the claimed row to done / skipped / failed inside ``session`` (raise :class:`LeaseLost` if not ours)."""
    row = session.execute(_FINISH, {**_params(c), "status": status, "stats": json_safe(stats),
                                    "last_error": _truncate(last_error)}).one_or_none()
    if row is None:
        raise LeaseLost(f"analysis {c.analysis_id}: lease of {c.worker} (attempt {c.attempts}) was lost; "
                        f"not marking it {status}")


def finish_now(c: Claim, status: str, *, stats: dict[str, Any], last_error: str | None = None) -> None:
    with session_scope() as session:
        finish(session, c, status, stats=stats, last_error=last_error)
    logger.info("analysis %s %s%s", c.analysis_id, status, f": {last_error}" if last_error else "")


def release(c: Claim, reason: str, settings: Settings) -> str | None:
    """Give the row back for another attempt (or fail it when attempts are used up); returns the new status."""
    with session_scope() as session:
        status = session.execute(_RELEASE, {**_params(c), "last_error": _truncate(reason),
                                            "max_attempts": settings.analysis.max_attempts}).scalar_one_or_none()
    logger.warning("analysis %s released after attempt %d (%s): %s", c.analysis_id, c.attempts, status, reason)
    return status


def _truncate(message: str | None) -> str | None:
    if message is None:
        return None
    return message if len(message) <= LAST_ERROR_MAX else message[: LAST_ERROR_MAX - 1] + "…"


def json_safe(value: Any) -> Any:
    """JSONB-storable copy: numpy scalars to Python, NaN/inf to null, dates to ISO strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def heartbeat_interval(settings: Settings) -> float:
    return max(0.5, min(float(settings.analysis.heartbeat_seconds), settings.analysis.lease_seconds / 3.0))


class Heartbeat:
    """Extends the lease of a claim in a background thread; ``lost`` is set when the row is no longer ours."""

    def __init__(self, c: Claim, settings: Settings, max_run_seconds: float = MAX_RUN_SECONDS):
        self.claim = c
        self.lease_seconds = settings.analysis.lease_seconds
        self.interval = heartbeat_interval(settings)
        self.max_run_seconds = max_run_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{c.analysis_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 30)

    def check(self) -> None:
        """Raise :class:`LeaseLost` between pipeline steps if the heartbeat found the row taken."""
        if self.lost.is_set():
            raise LeaseLost(f"analysis {self.claim.analysis_id}: lease lost while running")

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.interval):
            if time.monotonic() - started > self.max_run_seconds:
                logger.error("analysis %s has run for more than %d s: no longer extending its lease",
                             self.claim.analysis_id, self.max_run_seconds)
                return
            try:
                with session_scope() as session:
                    rows = session.execute(_HEARTBEAT, {**_params(self.claim), "lease": self.lease_seconds}).rowcount
            except Exception as exc:  # a DB blip must not kill the thread; the lease has slack (interval ≤ lease/3)
                logger.warning("heartbeat of analysis %s failed: %s", self.claim.analysis_id, exc)
                continue
            if rows == 0:
                logger.warning("analysis %s: lease lost (row re-queued or finished elsewhere)", self.claim.analysis_id)
                self.lost.set()
                return
