"""The Celery application of the analysis workers.

Start workers with ``unirs-monitor worker`` (workers/cli.py), which runs::

    celery -A workers.celery_app worker --queues cpu --concurrency 2            # raster prep + spectral
    celery -A workers.celery_app worker --queues gpu --pool solo --concurrency 1  # UniRS, one per GPU

**GPU workers use ``--pool solo``**: CUDA cannot be initialised in a parent and used in forked children
(celery/celery#3402), and one process per GPU keeps one copy of the model in memory. The model is loaded
once per worker process in the ``worker_process_init`` signal (sent by the prefork children *and*, in
Celery 5.7, by the solo pool in the worker process itself), never per task.

Reliability (design notes §3.6), all settings below:

- Messages carry an analysis id only; the state lives in the ``analyses`` table (workers/leases.py).
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged after the task returns, and
  re-delivered if the pool process running it dies. Duplicates are harmless: the claim is atomic and a
  done/failed row is never run again.
- ``worker_prefetch_multiplier = 1``: a worker holds one message per process, so a long analysis does not
  sit on messages other workers could run.
- Redis ``visibility_timeout`` (an unacknowledged message is re-delivered after it) is set well above the
  longest task (:data:`TASK_TIME_LIMIT`) and the lease; otherwise Redis re-delivers running tasks
  (celery/celery#5935). Recovery from a dead worker does not wait for it: the dispatcher re-queues rows
  whose lease expired. With RabbitMQ the equivalent is the broker's ``consumer_timeout`` (default 30 min),
  which must also exceed the longest task.
- Results are not needed (the table is the result); a result backend is used only if configured.
"""

from __future__ import annotations

import logging

from celery import Celery, signals

from core.config import Settings, get_settings
from core.jobs import QUEUES, TASK_NAME
from core.observations import TASK_NAME as OBSERVE_TASK_NAME
from workers.leases import MAX_RUN_SECONDS

logger = logging.getLogger(__name__)

__all__ = ["QUEUES", "TASK_NAME", "app", "make_app", "settings"]
#: Hard limit of one analysis (prefork pool only; solo cannot enforce it — the heartbeat stops extending
#: the lease after the same time, so a stuck GPU worker's analysis is still recovered).
TASK_TIME_LIMIT = MAX_RUN_SECONDS


def make_app(settings: Settings) -> Celery:
    app = Celery("unirs", broker=settings.broker_url, backend=settings.result_backend,
                 include=["workers.tasks", "workers.observe_tasks"])
    visibility_timeout = max(2 * TASK_TIME_LIMIT, 4 * settings.analysis.lease_seconds)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=TASK_TIME_LIMIT,
        task_ignore_result=settings.result_backend is None,
        task_default_queue="cpu",
        task_create_missing_queues=True,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": visibility_timeout},
        result_backend_transport_options={"visibility_timeout": visibility_timeout},
        broker_connection_retry_on_startup=True,
        # Keep retrying a lost broker: the worker must survive a Redis/RabbitMQ restart.
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Dispatch names the queue explicitly; these are the defaults.
        task_routes={TASK_NAME: {"queue": "cpu"}, OBSERVE_TASK_NAME: {"queue": "cpu"}},
    )
    return app


#: The worker program's entry point reads the settings here, once; tasks hand them down (workers/tasks.py).
settings = get_settings()
app = make_app(settings)


@signals.setup_logging.connect
def _setup_logging(**_: object) -> None:
    # One logging format for the whole service (core/logging.py), JSON when configured.
    from core.logging import setup_logging

    setup_logging(settings.log_level, settings.log_format)


@signals.worker_process_init.connect
def _init_process(**_: object) -> None:
    """Per worker process: fresh DB connections (never the parent's sockets) and the model, once."""
    from core.db import reset_engines

    reset_engines()
    if settings.model.weights_path is None or not _consumes_gpu_queue():
        return
    from workers import unirs

    unirs.load_model(settings)


def _consumes_gpu_queue() -> bool:
    # Workers started with --queues cpu never load the model (a CPU worker with configured weights would
    # otherwise hold a model it never uses).
    if settings.worker_queues:
        return "gpu" in settings.worker_queues.split(",")
    try:
        consumed = app.amqp.queues.consume_from
    except AttributeError:
        return True
    return not consumed or "gpu" in consumed
