"""Observations per (area, acquisition): computed by ``cpu`` workers, or in this process when none is asked.

A poll leaves ``pending`` rows (an active area × an acquisition one of whose granules touches it). Their
covered and clear fractions are computed per acquisition, for every area waiting on it at once
(:func:`eo.observe_rows.observe_rows`: one mask read per granule and window of areas, one batched write):

- :func:`dispatch_observations` (the scheduler): one ``unirs.observe(acquisition id)`` message per
  acquisition with due rows, published by task name to the ``cpu`` queue (several workers share the
  acquisitions); the rows are stamped sent in the publishing transaction, and rows still due long after
  are sent again (:mod:`core.observations`: the rows are the durable state, not the queue);
- :func:`observe_pending` (``poll --once``, backfill, tests): the same computation here, oldest acquisition first.

Every status change is a :mod:`core.observations` transition; :mod:`monitor.pairing` then settles the
computed clear rows.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from core import observations as job
from core.config import Settings
from core.db import session_scope
from eo.observe_rows import observe_rows

logger = logging.getLogger(__name__)

#: Publishes one acquisition id to a queue.
Sender = Callable[[int, str], None]


@dataclass
class ObserveStats:
    computed: int = 0
    by_status: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    granule_reads: int = 0
    dispatched: int = 0
    gave_up: int = 0  # rows settled failed after too many attempts without an outcome


def observe_pending(settings: Settings, *, area_ids: Iterable[int] | None = None, limit: int | None = None,
                    progress: Any = None) -> ObserveStats:
    """Compute every due observation in this process, acquisition by acquisition (oldest first). Idempotent."""
    with session_scope(settings) as session:
        groups = job.due_acquisitions(session, area_ids=list(area_ids) if area_ids is not None else None,
                                      limit=limit)
    stats = ObserveStats()
    if progress is not None:
        progress.reset(total=sum(len(v) for v in groups.values()))
    max_attempts = settings.analysis.observation_max_attempts
    for acquisition_id, ids in groups.items():
        with session_scope(settings) as session:
            started = job.begin(session, acquisition_id, max_attempts, ids)
        stats.gave_up += len(ids) - len(started)
        if not started:
            continue
        try:
            done = observe_rows(settings, acquisition_id, started)
        except Exception as exc:
            # One broken acquisition must not stop the others; its rows stay due, retried next run (at most
            # max_attempts times: then they are given up).
            logger.exception("observing acquisition %d for %d areas failed; will retry", acquisition_id,
                             len(started))
            with session_scope(settings) as session:
                job.note_error(session, acquisition_id, started, job.one_line(exc))
            continue
        stats.computed += done.computed
        stats.granule_reads += done.granule_reads
        for status, n in (done.by_status or {}).items():
            stats.by_status[status] += n
        if progress is not None:
            progress.update(len(ids))
    return stats


def celery_sender(settings: Settings) -> Sender:
    """Publish ``unirs.observe(acquisition id)`` by task name on ``settings.broker_url``."""
    from monitor.dispatch import celery_sender as sender

    return sender(settings, task_name=job.TASK_NAME)


def dispatch_observations(settings: Settings, *, send: Sender | None = None,
                          resend_seconds: float = job.RESEND_SECONDS) -> ObserveStats:
    """One message per acquisition with due rows not in flight (never sent, or sent more than
    ``resend_seconds`` ago: a lost message or a killed worker). Each acquisition is stamped and published in
    its own transaction, the publish before the commit: a broker that is down leaves the rows as they were.
    Rows not in flight that already had ``analysis.observation_max_attempts`` attempts are given up instead;
    rows sent but never started are re-sent with a doubling delay (``analysis.resend_backoff_max_seconds``)."""
    send = send or celery_sender(settings)
    stats = ObserveStats()
    backoff_max = settings.analysis.resend_backoff_max_seconds
    with session_scope(settings) as session:
        stats.gave_up = len(job.give_up(session, settings.analysis.observation_max_attempts,
                                        resend_seconds=resend_seconds, backoff_max=backoff_max))
    with session_scope(settings) as session:
        groups = job.due_acquisitions(session, unsent_only=True, resend_seconds=resend_seconds,
                                      backoff_max=backoff_max)
    for acquisition_id in groups:
        try:
            with session_scope(settings) as session:
                if job.mark_sent(session, acquisition_id, resend_seconds, backoff_max):
                    send(acquisition_id, job.QUEUE.value)
                    stats.dispatched += 1
        except Exception as exc:
            logger.warning("observation dispatch stopped (broker down?): %s: %s", type(exc).__name__, exc)
            break
    if stats.dispatched:
        logger.info("observations: %d acquisitions sent to the %s queue (%d areas waiting)", stats.dispatched,
                    job.QUEUE.value, sum(len(v) for v in groups.values()))
    return stats
