"""The worker side of the analysis job: claim, heartbeat, finish, release.

The transitions themselves (SQL, statuses, fencing) are :mod:`core.jobs`; this module adds the logging and
the heartbeat thread.

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
- **database unreachable** at the claim or at a give-back: one warning line and nothing else — the row is
  exactly where it was (queued with its message gone, or running with a lease that will expire), and the
  dispatcher re-sends it; an exception out of the task would only add a traceback.
- **fencing**: every later write is guarded by ``worker`` *and* ``attempts`` of this claim. If the lease
  was lost (the row was re-queued and claimed by someone else), the guarded UPDATE matches no row and the
  whole finishing transaction — findings included — is rolled back (:class:`LeaseLost`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError

from core import jobs
from core.config import Settings
from core.db import session_scope
from core.jobs import Claim, LeaseLost, json_safe
from core.models import AnalysisStatus

__all__ = ["MAX_RUN_SECONDS", "Claim", "Heartbeat", "LeaseLost", "claim", "finish", "finish_now", "json_safe",
           "release"]

logger = logging.getLogger(__name__)

# A task that keeps heartbeating longer than this is presumed stuck (a hung read): the heartbeat stops
# extending the lease so the dispatcher can recover the row. Also the Celery hard time limit.
MAX_RUN_SECONDS = 3600


def claim(analysis_id: int, worker: str, settings: Settings) -> Claim | None:
    """Take the analysis for this worker, or None (already taken, finished, out of attempts, or the database
    unreachable)."""
    try:
        with session_scope(settings) as session:
            result = jobs.claim(session, analysis_id, worker, settings)
    except (OperationalError, InterfaceError) as exc:
        logger.warning("analysis %s not claimed: database unreachable (%s); the dispatcher re-sends it",
                       analysis_id, _first_line(exc))
        return None
    if result is None:
        logger.warning("analysis %s does not exist (deleted?); message dropped", analysis_id)
        return None
    if not isinstance(result, Claim):
        logger.info("analysis %s not claimed: status %s, worker %s, attempts %s, lease until %s — nothing to do",
                    analysis_id, result["status"], result["worker"], result["attempts"], result["lease_expires_at"])
        return None
    logger.info("analysis %s claimed by %s (attempt %d)", analysis_id, worker, result.attempts)
    return result


def finish(session: Any, c: Claim, status: AnalysisStatus | str, *, stats: dict[str, Any],
           last_error: str | None = None, analyser_run: jobs.AnalyserSpec | None = None) -> None:
    """Move the claimed row to done / skipped / failed inside ``session`` (raise :class:`LeaseLost` if not ours)."""
    jobs.finish(session, c, AnalysisStatus(status), stats=stats, last_error=last_error, analyser_run=analyser_run)


def finish_now(c: Claim, status: AnalysisStatus | str, settings: Settings, *, stats: dict[str, Any],
               last_error: str | None = None, analyser_run: jobs.AnalyserSpec | None = None) -> None:
    with session_scope(settings) as session:
        finish(session, c, status, stats=stats, last_error=last_error, analyser_run=analyser_run)
    logger.info("analysis %s %s%s", c.analysis_id, AnalysisStatus(status).value,
                f": {last_error}" if last_error else "")


def release(c: Claim, reason: str, settings: Settings) -> str | None:
    """Give the row back for another attempt (or fail it when attempts are used up); returns the new status,
    or None when the database is unreachable (the row stays running until its lease expires)."""
    try:
        with session_scope(settings) as session:
            status = jobs.release(session, c, reason, settings)
    except (OperationalError, InterfaceError) as exc:
        logger.warning("analysis %s not given back after attempt %d: database unreachable (%s); the dispatcher "
                       "re-queues it when its lease expires", c.analysis_id, c.attempts, _first_line(exc))
        return None
    logger.warning("analysis %s released after attempt %d (%s): %s", c.analysis_id, c.attempts,
                   status.value if status else None, reason)
    return status.value if status else None


def _first_line(exc: BaseException) -> str:
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]


def heartbeat_interval(settings: Settings) -> float:
    return max(0.5, min(float(settings.analysis.heartbeat_seconds), settings.analysis.lease_seconds / 3.0))


class Heartbeat:
    """Extends the lease of a claim in a background thread; ``lost`` is set when the row is no longer ours."""

    def __init__(self, c: Claim, settings: Settings, max_run_seconds: float = MAX_RUN_SECONDS):
        self.claim = c
        self.settings = settings
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
                with session_scope(self.settings) as session:
                    ours = jobs.extend_lease(session, self.claim, self.lease_seconds)
            except Exception as exc:  # a DB blip must not kill the thread; the lease has slack (interval ≤ lease/3)
                logger.warning("heartbeat of analysis %s failed: %s", self.claim.analysis_id, exc)
                continue
            if not ours:
                logger.warning("analysis %s: lease lost (row re-queued or finished elsewhere)", self.claim.analysis_id)
                self.lost.set()
                return
