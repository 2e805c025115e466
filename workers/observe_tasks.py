"""Celery task of the observations: one acquisition's due (area, acquisition) rows, on the ``cpu`` queue.

Thin: the work is :func:`eo.observe_rows.observe_rows` (ground floor, so the scheduler can run the same code in
its own process when it has no workers). The message carries the acquisition id only; the rows say what to do.
Run twice — a re-delivery after a killed worker (``acks_late`` + ``reject_on_worker_lost``), or a re-send by
:func:`monitor.observations.dispatch_observations` — it writes once: rows already computed are no longer due.
"""

from __future__ import annotations

import logging
import os
import time

from core import observations as job
from core.db import session_scope
from workers.celery_app import app, settings

logger = logging.getLogger(__name__)

#: Test-only hook: seconds to wait before observing (gives tests a window to kill a worker mid-task).
TEST_DELAY_ENV = "UNIRS_TEST_OBSERVE_DELAY_SECONDS"
#: Test-only hook: the task raises for this acquisition id (a task that always fails).
TEST_FAIL_ENV = "UNIRS_TEST_OBSERVE_FAIL_ACQUISITION"


@app.task(name=job.TASK_NAME, acks_late=True, reject_on_worker_lost=True)
def observe(acquisition_id: int) -> int:
    """Compute and store the due observations of acquisition ``acquisition_id``; returns how many.

    Each run is an attempt (:func:`core.observations.begin`); one that raises records its error on the rows
    and raises, and rows with ``analysis.observation_max_attempts`` attempts are given up when asked again."""
    from eo.observe_rows import observe_rows

    acquisition_id = int(acquisition_id)
    with session_scope(settings) as session:
        started = job.begin(session, acquisition_id, settings.analysis.observation_max_attempts)
    if not started:
        logger.info("acquisition %s: 0 observations computed (nothing due)", acquisition_id)
        return 0
    try:
        delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
        if delay > 0:  # test-only hook: a window to kill the worker mid-task
            logger.warning("test hook %s: waiting %.1f s before observing acquisition %s", TEST_DELAY_ENV, delay,
                           acquisition_id)
            time.sleep(delay)
        if os.environ.get(TEST_FAIL_ENV) == str(acquisition_id):
            raise RuntimeError(f"test hook {TEST_FAIL_ENV}: acquisition {acquisition_id} always fails")
        done = observe_rows(settings, acquisition_id, started)
    except Exception as exc:
        with session_scope(settings) as session:
            job.note_error(session, acquisition_id, started, job.one_line(exc))
        raise
    logger.info("acquisition %s: %d observations computed (%s), %d granule windows read from %d files",
                acquisition_id, done.computed, dict(done.by_status or {}), done.granule_reads, done.granule_opens)
    return done.computed
