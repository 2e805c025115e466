"""The dispatcher: from rows in ``analyses`` to Celery messages, and recovery of lost work.

Called every ``analysis.dispatch_interval_seconds`` by the scheduler (``dispatch_once()``). Each call:

1. **Lost, out of attempts** — ``running`` with an expired lease and ``attempts >= max_attempts`` →
   ``failed`` with the reason ("worker lost 3 times; last worker …").
2. **Lost, attempts left** — ``running`` with an expired lease → ``queued`` again and re-sent. A worker
   that dies (kill -9, OOM, machine gone) stops heartbeating; its lease runs out; this is where the work
   comes back. (The worker's own message may also be re-delivered by the broker; whichever arrives first
   claims the row, the other finds it taken and does nothing.)
3. **Lost with the broker** — per queue, the broker's message count is compared with the ``queued`` rows
   that were published (``worker`` NULL, see :mod:`core.jobs`); when the broker holds fewer (a Redis
   restart without persistence empties it), that many of the oldest such rows queued longer than
   ``analysis.queued_resend_seconds`` are re-sent in this pass. A message a worker has just taken but
   not yet claimed looks missing too: at worst one duplicate, which costs one no-op claim.
4. **Queued too long** — ``queued`` for more than :data:`QUEUED_RESEND_FACTOR` × lease without being
   claimed → re-sent. The backstop when the broker cannot be asked, and the back-off of rows a worker
   gave back after a transient error (it leaves them ``queued`` without a message). Each send of 3. or 4.
   that no worker claimed doubles the delay before the next (up to ``analysis.resend_backoff_max_seconds``):
   a queue nobody consumes is not flooded, and the row runs when a worker comes back.
5. **Pending** — ``pending`` (new rows from monitor.pairing) → ``queued`` and sent.

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

from sqlalchemy import text

from core import jobs
from core.config import Settings
from core.db import session_scope

logger = logging.getLogger(__name__)

QUEUED_RESEND_FACTOR = 2
BATCH_LIMIT = 1000
# Publishing gives up quickly when the broker is down: the row stays put and the next call retries.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}

Sender = Callable[[int, str], None]
# Messages waiting in a queue of the broker, or None when the broker cannot say.
Depth = Callable[[str], "int | None"]

_producers: dict[str, Any] = {}


def celery_sender(settings: Settings, task_name: str = jobs.TASK_NAME) -> Sender:
    """Publish ``task_name(id)`` (default ``unirs.analyse``) by name to the given queue on ``settings.broker_url``."""
    from celery import Celery

    app = _producers.get(settings.broker_url)
    if app is None:
        app = _producers[settings.broker_url] = Celery("unirs-dispatch", broker=settings.broker_url)
        app.conf.update(broker_connection_retry_on_startup=True, task_serializer="json")

    def send(analysis_id: int, queue: str) -> None:
        app.send_task(task_name, args=[analysis_id], queue=str(queue), retry=True,
                      retry_policy=PUBLISH_RETRY_POLICY)

    return send


def broker_depth(settings: Settings) -> Depth:
    """Ready messages per queue on ``settings.broker_url`` (kombu passive declare; Redis and AMQP)."""
    from kombu import Connection
    from kombu.exceptions import ChannelError

    def depth(queue: str) -> int | None:
        try:
            with Connection(settings.broker_url, connect_timeout=2) as conn:
                conn.ensure_connection(max_retries=1)
                try:
                    return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
                except ChannelError:  # no such queue: Redis drops an empty list, a restarted broker has none
                    return 0
        except Exception as exc:  # broker down or unsupported: fall back to the long backstop
            logger.debug("broker depth of %s unknown: %s", queue, exc)
            return None

    return depth


def dispatch_once(settings: Settings, *, send: Sender | None = None,
                  depth: Depth | None = None, limit: int = BATCH_LIMIT) -> dict[str, Any]:
    """One dispatcher pass; returns counts: failed, requeued, lost (re-sent: missing from the broker),
    resent (queued too long), queued, and errors (broker down…)."""
    # A caller's own sender may publish elsewhere than settings.broker_url: then ask it for the depth too.
    depth = depth or (broker_depth(settings) if send is None else (lambda queue: None))
    send = send or celery_sender(settings)
    summary: dict[str, Any] = {"failed": 0, "requeued": 0, "lost": 0, "resent": 0, "queued": 0, "errors": []}

    stale_seconds = QUEUED_RESEND_FACTOR * settings.analysis.lease_seconds
    backoff_max = settings.analysis.resend_backoff_max_seconds
    with session_scope(settings) as session:
        failed = jobs.fail_lost(session, settings, limit=limit)
    for moved in failed:
        logger.error("analysis %s failed: %s", moved.id, moved.reason)
    summary["failed"] = len(failed)

    with session_scope(settings) as session:
        pass_started = session.execute(text("SELECT now()")).scalar_one()
    steps: list[tuple[str, Callable[[Any], jobs.Moved | None], int]] = [
        ("requeued", lambda session: jobs.requeue_lost(session, settings), limit)]
    for _queue, (missing, analysers) in _missing_messages(settings, depth).items():
        steps.append(("lost", lambda session, a=analysers: jobs.resend_sent_queued(
            session, a, settings.analysis.queued_resend_seconds, pass_started, backoff_max), min(missing, limit)))
    steps += [("resent", lambda session: jobs.touch_stale_queued(session, stale_seconds, backoff_max), limit),
              ("queued", jobs.queue_next_pending, limit)]
    for key, transition, budget in steps:
        for _ in range(budget):
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
            elif key == "lost":
                logger.warning("analysis %s missing from the broker (restarted?): re-sent to %s", moved.id,
                               moved.queue.value)
            elif key == "resent":
                logger.info("analysis %s queued too long (message lost?): re-sent to %s", moved.id, moved.queue.value)
            else:
                logger.debug("analysis %s queued to %s", moved.id, moved.queue.value)
    _log_summary(summary)
    return summary


def _missing_messages(settings: Settings, depth: Depth) -> dict[jobs.Queue, tuple[int, list[str]]]:
    """Per queue: published ``queued`` rows minus the broker's message count, when positive."""
    with session_scope(settings) as session:
        counts = jobs.sent_queued_counts(session)
    missing = {}
    for queue, (rows, analysers) in counts.items():
        held = depth(queue.value)
        if held is not None and held < rows:
            missing[queue] = (rows - held, analysers)
    return missing


def _log_summary(summary: dict[str, Any]) -> None:
    if any(summary[k] for k in ("failed", "requeued", "lost", "resent", "queued")) or summary["errors"]:
        logger.info("dispatch: %d queued, %d re-queued after a lost worker, %d re-sent (missing from the broker), "
                    "%d re-sent (queued too long), %d failed%s",
                    summary["queued"], summary["requeued"], summary["lost"], summary["resent"], summary["failed"],
                    f", errors: {summary['errors']}" if summary["errors"] else "")
