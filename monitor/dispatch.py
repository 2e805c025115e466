"""The dispatcher: from rows in ``analyses`` to Celery messages, and recovery of lost work.

Called every ``analysis.dispatch_interval_seconds`` by the scheduler (``dispatch_once()``). Each call:

1. **Lost, out of attempts** — ``running`` with an expired lease and ``attempts >= max_attempts`` →
   ``failed`` with the reason ("worker lost 3 times; last worker …").
2. **Lost, attempts left** — ``running`` with an expired lease → ``queued`` again and re-sent. A worker
   that dies (kill -9, OOM, machine gone) stops heartbeating; its lease runs out; this is where the work
   comes back. (The worker's own message may also be re-delivered by the broker; whichever arrives first
   claims the row, the other finds it taken and does nothing.)
3. **Queued too long** — ``queued`` for more than :data:`QUEUED_RESEND_FACTOR` × lease without being
   claimed → re-sent. This is what makes a broker restart harmless: messages lost with the broker
   are sent again from the table, and rows a worker gave back after a transient error (it leaves them
   ``queued`` without a message) are retried after this back-off. A duplicate message costs one no-op
   claim.
4. **Pending** — ``pending`` (new rows from monitor.pairing) → ``queued`` and sent.

Queue: ``gpu`` when the analyser includes UniRS, else ``cpu``. Messages carry the analysis id only.

Each row is moved and sent in its own transaction, and the message is published *before* the commit: if
the broker is down the publish raises, the transaction rolls back and the row stays as it was for the next
call. If the commit fails after a publish, the worker's claim still accepts the row (``pending`` is
claimable), so nothing is lost either way. ``FOR UPDATE SKIP LOCKED`` lets several dispatchers run.
All times are the database's ``now()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from monitor.config import Settings, get_settings
from monitor.db import session_scope

logger = logging.getLogger(__name__)

QUEUED_RESEND_FACTOR = 2
BATCH_LIMIT = 1000
# Publishing gives up quickly when the broker is down: the row stays put and the next call retries.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}

Sender = Callable[[int, str], None]

_FAIL_LOST = text("""
    UPDATE analyses
       SET status = 'failed', finished_at = now(), lease_expires_at = NULL,
           last_error = 'worker lost ' || attempts || ' times; last worker ' || coalesce(worker, 'unknown')
                        || ' (lease expired at ' || lease_expires_at || ')'
     WHERE id IN (SELECT id FROM analyses
                   WHERE status = 'running' AND lease_expires_at < now() AND attempts >= :max_attempts
                   ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED)
 RETURNING id, last_error
""")

_REQUEUE_LOST = text("""
    UPDATE analyses
       SET status = 'queued', queued_at = now(),
           last_error = 'attempt ' || attempts || ' lost: worker ' || coalesce(worker, 'unknown')
                        || ' stopped heartbeating (lease expired at ' || lease_expires_at || '); re-queued',
           lease_expires_at = NULL
     WHERE id = (SELECT id FROM analyses
                  WHERE status = 'running' AND lease_expires_at < now() AND attempts < :max_attempts
                  ORDER BY lease_expires_at LIMIT 1 FOR UPDATE SKIP LOCKED)
 RETURNING id, analyser, last_error
""")

_RESEND_QUEUED = text("""
    UPDATE analyses SET queued_at = now()
     WHERE id = (SELECT id FROM analyses
                  WHERE status = 'queued' AND queued_at < now() - make_interval(secs => :stale_seconds)
                  ORDER BY queued_at LIMIT 1 FOR UPDATE SKIP LOCKED)
 RETURNING id, analyser
""")

_QUEUE_PENDING = text("""
    UPDATE analyses SET status = 'queued', queued_at = now()
     WHERE id = (SELECT id FROM analyses WHERE status = 'pending'
                  ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
 RETURNING id, analyser
""")


def celery_sender() -> Sender:
    """Publish ``unirs.analyse(id)`` by task name to the given queue (imports the Celery app lazily)."""
    from workers.celery_app import TASK_NAME, app

    def send(analysis_id: int, queue: str) -> None:
        app.send_task(TASK_NAME, args=[analysis_id], queue=queue, retry=True, retry_policy=PUBLISH_RETRY_POLICY)

    return send


def dispatch_once(settings: Settings | None = None, *, send: Sender | None = None,
                  limit: int = BATCH_LIMIT) -> dict[str, Any]:
    """One dispatcher pass; returns counts: failed, requeued, resent, queued, and errors (broker down…)."""
    from workers.celery_app import queue_for  # the routing rule lives with the Celery app

    settings = settings or get_settings()
    send = send or celery_sender()
    analysis = settings.analysis
    summary: dict[str, Any] = {"failed": 0, "requeued": 0, "resent": 0, "queued": 0, "errors": []}

    with session_scope() as session:
        failed = session.execute(_FAIL_LOST, {"max_attempts": analysis.max_attempts, "limit": limit}).all()
    for row in failed:
        logger.error("analysis %s failed: %s", row.id, row.last_error)
    summary["failed"] = len(failed)

    steps = (
        ("requeued", _REQUEUE_LOST, {"max_attempts": analysis.max_attempts}),
        ("resent", _RESEND_QUEUED, {"stale_seconds": QUEUED_RESEND_FACTOR * analysis.lease_seconds}),
        ("queued", _QUEUE_PENDING, {}),
    )
    for key, statement, params in steps:
        for _ in range(limit):
            try:
                with session_scope() as session:
                    row = session.execute(statement, params).one_or_none()
                    if row is None:
                        break
                    queue = queue_for(row.analyser)
                    send(row.id, queue)  # before the commit: a failed publish rolls the row back
            except Exception as exc:
                message = f"{key}: could not publish (broker down?): {type(exc).__name__}: {exc}"
                logger.warning("dispatch stopped: %s", message)
                summary["errors"].append(message)
                _log_summary(summary)
                return summary
            summary[key] += 1
            if key == "requeued":
                logger.warning("analysis %s re-queued to %s: %s", row.id, queue, row.last_error)
            elif key == "resent":
                logger.info("analysis %s queued too long (message lost?): re-sent to %s", row.id, queue)
            else:
                logger.debug("analysis %s queued to %s", row.id, queue)
    _log_summary(summary)
    return summary


def _log_summary(summary: dict[str, Any]) -> None:
    if any(summary[k] for k in ("failed", "requeued", "resent", "queued")) or summary["errors"]:
        logger.info("dispatch: %d queued, %d re-queued after a lost worker, %d re-sent, %d failed%s",
                    summary["queued"], summary["requeued"], summary["resent"], summary["failed"],
                    f", errors: {summary['errors']}" if summary["errors"] else "")
