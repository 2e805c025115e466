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

Queue: :func:`core.jobs.queue_for` (``gpu`` when the analysis asks for UniRS, else ``cpu``). Messages carry
the analysis id only; the task is published by name (:data:`core.jobs.TASK_NAME`), so the control plane
never imports the workers. Every status change is a :mod:`core.jobs` transition.

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

from core import jobs
from core.config import Settings, get_settings
from core.db import session_scope

logger = logging.getLogger(__name__)

QUEUED_RESEND_FACTOR = 2
BATCH_LIMIT = 1000
# Publishing gives up quickly when the broker is down: the row stays put and the next call retries.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}

Sender = Callable[[int, str], None]

_producers: dict[str, Any] = {}


def celery_sender(settings: Settings) -> Sender:
    """Publish ``unirs.analyse(id)`` by task name to the given queue on ``settings.broker_url``."""
    from celery import Celery

    app = _producers.get(settings.broker_url)
    if app is None:
        app = _producers[settings.broker_url] = Celery("unirs-dispatch", broker=settings.broker_url)
        app.conf.update(broker_connection_retry_on_startup=True, task_serializer="json")

    def send(analysis_id: int, queue: str) -> None:
        app.send_task(jobs.TASK_NAME, args=[analysis_id], queue=str(queue), retry=True,
                      retry_policy=PUBLISH_RETRY_POLICY)

    return send


def dispatch_once(settings: Settings | None = None, *, send: Sender | None = None,
                  limit: int = BATCH_LIMIT) -> dict[str, Any]:
    """One dispatcher pass; returns counts: failed, requeued, resent, queued, and errors (broker down…)."""
    settings = settings or get_settings()
    send = send or celery_sender(settings)
    summary: dict[str, Any] = {"failed": 0, "requeued": 0, "resent": 0, "queued": 0, "errors": []}

    with session_scope(settings) as session:
        failed = jobs.fail_lost(session, settings, limit=limit)
    for moved in failed:
        logger.error("analysis %s failed: %s", moved.id, moved.reason)
    summary["failed"] = len(failed)

    stale_seconds = QUEUED_RESEND_FACTOR * settings.analysis.lease_seconds
    steps: tuple[tuple[str, Callable[[Any], jobs.Moved | None]], ...] = (
        ("requeued", lambda session: jobs.requeue_lost(session, settings)),
        ("resent", lambda session: jobs.touch_stale_queued(session, stale_seconds)),
        ("queued", jobs.queue_next_pending),
    )
    for key, transition in steps:
        for _ in range(limit):
            try:
                with session_scope(settings) as session:
                    moved = transition(session)
                    if moved is None:
                        break
                    send(moved.id, moved.queue.value)  # before the commit: a failed publish rolls the row back
            except Exception as exc:
                message = f"{key}: could not publish (broker down?): {type(exc).__name__}: {exc}"
                logger.warning("dispatch stopped: %s", message)
                summary["errors"].append(message)
                _log_summary(summary)
                return summary
            summary[key] += 1
            if key == "requeued":
                logger.warning("analysis %s re-queued to %s: %s", moved.id, moved.queue.value, moved.reason)
            elif key == "resent":
                logger.info("analysis %s queued too long (message lost?): re-sent to %s", moved.id, moved.queue.value)
            else:
                logger.debug("analysis %s queued to %s", moved.id, moved.queue.value)
    _log_summary(summary)
    return summary


def _log_summary(summary: dict[str, Any]) -> None:
    if any(summary[k] for k in ("failed", "requeued", "resent", "queued")) or summary["errors"]:
        logger.info("dispatch: %d queued, %d re-queued after a lost worker, %d re-sent, %d failed%s",
                    summary["queued"], summary["requeued"], summary["resent"], summary["failed"],
                    f", errors: {summary['errors']}" if summary["errors"] else "")
