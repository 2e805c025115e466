"""The scheduler: one leader (PostgreSQL advisory lock) runs poll → pair, dispatch and report jobs.

Any number of ``unirs-monitor scheduler`` processes may run (on several hosts, for availability); the
one holding the leader lock schedules work, the others wait and retry every few seconds. When the
leader dies its connection closes, the lock is released and a stand-by takes over within
``retry_seconds``. A leader that loses its lock connection stops scheduling at once (its watchdog
notices) and goes back to waiting, so two leaders never run jobs at the same time.

Jobs (APScheduler 3, ``BlockingScheduler``; each job is single-instance and coalesced):

- ``poll``: every ``poll.interval_minutes``: poll every catalogue, the late sweep where it is due
  (``poll.late_sweep_hours``, ``monitor/catalogues/late.py``) under the poll-cycle lock, then, under the
  separate pairing lock, send the new observations to the ``cpu`` workers (one ``unirs.observe`` task per
  acquisition, :mod:`monitor.observations`) and pair what is already observed;
- ``pair``: periodically, for observations still pending (a crash mid-pairing, failed reads due a retry);
- ``dispatch``: every ``analysis.dispatch_interval_seconds``: pair what the workers observed since (and re-send
  lost observation tasks), then ``monitor.dispatch.dispatch_once(settings)``;
- ``reports``: ``monitor.reports.run_deliveries(settings)`` (alerts for analyses the workers finished);
- ``health``: hourly, a WARNING (once per day per area) for each active area without a clear scene for
  ``reports.no_clear_scene_days`` (``monitor.metrics.areas_without_clear_scene``).

With ``metrics_port`` set, :func:`run_scheduler` also serves the Prometheus metrics (``monitor/metrics.py``;
every scheduler, leader or not: they are read from the database).

Every job gets the ``Settings`` the scheduler was built with (one configuration per process, read once by
the ``unirs-monitor`` entry point); a failing job is logged and runs again at its next time.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler

from core.config import Settings
from monitor.dispatch import dispatch_once
from monitor.locks import (
    CYCLE_LOCK,
    LEADER_LOCK,
    PAIR_LOCK,
    AdvisoryLock,
    cycle_lock,
    try_cycle_lock,
    wait_for_leadership,
)
from monitor.reports import run_deliveries

logger = logging.getLogger(__name__)

JOBS = ("poll", "pair", "dispatch", "reports", "health")
PAIR_INTERVAL_SECONDS = 300.0
REPORTS_INTERVAL_SECONDS = 60.0
HEALTH_INTERVAL_SECONDS = 3600.0


@dataclass
class CycleSummary:
    """What one poll → pair → dispatch cycle did (printed by ``poll --once``)."""

    items_seen: int = 0
    new_scenes: int = 0
    upgraded_scenes: int = 0
    quarantined: int = 0
    observations: int = 0
    analyses_created: int = 0
    search_requests: int = 0
    late_items: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def poll_and_pair(settings: Settings, *, now: datetime | None = None, observe_in_workers: bool = False) -> CycleSummary:
    """Poll every catalogue, sweep for late items where due, then settle the pending observations (one
    cycle, serialised across processes): computed here, or sent to the ``cpu`` workers (``observe_in_workers``:
    the scheduler; their results are paired by the next ``pair`` or ``dispatch`` job)."""
    from monitor.catalogues import poll_all
    from monitor.catalogues.late import sweep_late_all
    from monitor.pairing import process_pending

    summary = CycleSummary()
    with cycle_lock(settings.database_url):
        polled = poll_all(settings, now=now)
        swept = sweep_late_all(settings, now=now)
    # Pairing reads cloud masks (seconds to minutes for many areas): outside the poll lock, under its own.
    with cycle_lock(settings.database_url, PAIR_LOCK):
        pairing = process_pending(settings, send_observations=_observation_sender(settings, observe_in_workers))
    summary.items_seen = polled.total("items_seen")
    summary.new_scenes = polled.total("new_scenes")
    summary.upgraded_scenes = polled.total("upgraded_scenes")
    summary.quarantined = polled.total("quarantined")
    summary.search_requests = polled.search_requests
    summary.observations = pairing.observations
    summary.analyses_created = pairing.analyses_created
    summary.late_items = polled.total("late_items") + sum(r.stats.late_items for r in swept)
    summary.errors = [f"{p.catalogue}/{p.collection}: {p.error}" for p in polled.polls if not p.ok]
    summary.errors += [f"{r.catalogue}/{r.collection} late sweep: {r.error}" for r in swept if not r.ok]
    return summary


def pair_pending(settings: Settings, *, observe_in_workers: bool = False) -> None:
    from monitor.pairing import process_pending

    with cycle_lock(settings.database_url, PAIR_LOCK):
        process_pending(settings, send_observations=_observation_sender(settings, observe_in_workers))


def pair_and_dispatch(settings: Settings) -> dict[str, Any]:
    """The scheduler's ``dispatch`` job: pair what the workers observed since the last run (lost observation
    tasks are sent again), then dispatch the analyses.

    Pairing is skipped, never waited for, while a poll holds the poll-cycle lock (an acquisition whose first
    page is stored but not its other granules must not be observed yet: its mosaic would be incomplete and
    the late-granule re-open compares against the compute time) or another pairing run holds the pairing
    lock (a backfill can hold it for hours). Analyses are dispatched and leases reclaimed in any case."""
    from monitor.pairing import process_pending

    try:
        with try_cycle_lock(settings.database_url, CYCLE_LOCK) as poll_idle:
            if poll_idle:
                with try_cycle_lock(settings.database_url, PAIR_LOCK) as pairing_idle:
                    if pairing_idle:
                        process_pending(settings, send_observations=_observation_sender(settings, True))
    except Exception as exc:
        logger.warning("pairing in the dispatch job failed (%s: %s); dispatching anyway", type(exc).__name__, exc)
    return dispatch_once(settings)


def _observation_sender(settings: Settings, in_workers: bool) -> Any:
    if not in_workers:
        return None
    from monitor.observations import celery_sender

    return celery_sender(settings)


_health_warned: dict[str, date] = {}


def check_health(settings: Settings, *, now: datetime | None = None,
                 warned: dict[str, date] = _health_warned) -> list[str]:
    """Log a WARNING for each active area without a clear scene for too long, once per (UTC) day per area."""
    from core.db import session_scope
    from monitor.metrics import areas_without_clear_scene

    now = now or datetime.now(UTC)
    days = settings.reports.no_clear_scene_days
    with session_scope(settings) as session:
        stale = areas_without_clear_scene(session, days, now=now)
    warned_now = []
    for name, last in stale:
        if warned.get(name) == now.date():
            continue
        warned[name] = now.date()
        warned_now.append(name)
        logger.warning("area %r has had no clear scene for more than %g days (last clear scene: %s)", name, days,
                       last.isoformat(timespec="minutes") if last else "none yet")
    return warned_now


class Scheduler:
    """Leader election + the APScheduler jobs. ``run()`` blocks until ``stop()`` (or SIGTERM/SIGINT)."""

    def __init__(self, settings: Settings, *, jobs: Iterable[str] = JOBS, retry_seconds: float = 5.0,
                 pair_interval_seconds: float = PAIR_INTERVAL_SECONDS,
                 reports_interval_seconds: float = REPORTS_INTERVAL_SECONDS):
        self.settings = settings
        self.jobs = tuple(jobs)
        unknown = set(self.jobs) - set(JOBS)
        if unknown:
            raise ValueError(f"unknown jobs {sorted(unknown)}; choose from {JOBS}")
        self.retry_seconds = retry_seconds
        self.pair_interval_seconds = pair_interval_seconds
        self.reports_interval_seconds = reports_interval_seconds
        self.lock = AdvisoryLock(LEADER_LOCK, self.settings.database_url, purpose="scheduler")
        self._stop = threading.Event()
        self._scheduler: BlockingScheduler | None = None
        self._lost = False

    def stop(self, *_: Any) -> None:
        self._stop.set()
        scheduler = self._scheduler
        if scheduler is not None and scheduler.running:
            scheduler.shutdown(wait=False)

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.stop)

    def run(self) -> None:
        while not self._stop.is_set():
            if not wait_for_leadership(self.lock, self.retry_seconds, self._stop.is_set):
                break
            logger.info("this scheduler is now the leader (jobs: %s)", ", ".join(self.jobs))
            try:
                self._lead()
            finally:
                self.lock.release()
            if self._lost and not self._stop.is_set():
                logger.warning("leadership lost; standing by")
                self._lost = False
        logger.info("scheduler stopped")

    def _lead(self) -> None:
        _import_job_modules()
        scheduler = BlockingScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300},
        )
        now = datetime.now(UTC)
        settings = self.settings
        if "poll" in self.jobs:
            scheduler.add_job(self._guard("poll", lambda: poll_and_pair(settings, observe_in_workers=True)), "interval",
                              minutes=settings.poll.interval_minutes, next_run_time=now, id="poll")
        if "pair" in self.jobs:
            scheduler.add_job(self._guard("pair", lambda: pair_pending(settings, observe_in_workers=True)), "interval",
                              seconds=self.pair_interval_seconds, id="pair")
        if "dispatch" in self.jobs:
            scheduler.add_job(self._guard("dispatch", lambda: pair_and_dispatch(settings)), "interval",
                              seconds=settings.analysis.dispatch_interval_seconds, next_run_time=now, id="dispatch")
        if "reports" in self.jobs:
            scheduler.add_job(self._guard("reports", lambda: run_deliveries(settings)), "interval",
                              seconds=self.reports_interval_seconds, id="reports")
        if "health" in self.jobs:
            scheduler.add_job(self._guard("health", lambda: check_health(settings)), "interval",
                              seconds=HEALTH_INTERVAL_SECONDS, next_run_time=now, id="health")
        scheduler.add_job(self._watchdog, "interval", seconds=max(1.0, self.retry_seconds), id="leader-watchdog")
        self._scheduler = scheduler
        if self._stop.is_set():
            return
        try:
            scheduler.start()  # blocks until shutdown
        finally:
            self._scheduler = None

    def _watchdog(self) -> None:
        if not self.lock.still_held():
            logger.error("leader lock no longer held (database connection lost): stopping all jobs")
            self._lost = True
            scheduler = self._scheduler
            if scheduler is not None:
                scheduler.shutdown(wait=False)

    def _guard(self, name: str, job: Callable[[], Any]) -> Callable[[], None]:
        """Run a job only while leader; log its failure instead of letting it kill the schedule."""

        def run() -> None:
            if self._lost or not self.lock.held:
                return
            try:
                result = job()
            except Exception:
                logger.exception("job %s failed; it runs again at its next time", name)
                return
            logger.debug("job %s done: %s", name, result)

        run.__name__ = f"job_{name}"
        return run


# What the jobs import lazily (so `unirs-monitor --help` and the poll-free commands stay fast).
JOB_MODULES = ("core.db", "monitor.catalogues", "monitor.catalogues.late", "monitor.pairing", "monitor.observations",
               "monitor.metrics", "monitor.dispatch", "celery", "kombu", "kombu.exceptions")


def _import_job_modules() -> None:
    """Import the jobs' modules in one thread before the pool's threads start: four jobs due at once
    importing the same packages can meet in each other's module locks (importlib's ``_DeadlockError``,
    seen in monitor.catalogues.identity when the scheduler started)."""
    for name in JOB_MODULES:
        importlib.import_module(name)


def run_scheduler(settings: Settings, **kwargs: Any) -> None:
    """The ``unirs-monitor scheduler`` process: metrics server (when configured), signals, leader loop."""
    scheduler = Scheduler(settings, **kwargs)
    if settings.metrics_port is not None:
        from monitor.metrics import serve

        try:
            serve(settings.metrics_port, settings.metrics_addr, settings)
        except OSError:
            logger.exception("cannot serve metrics on %s:%s; continuing without", settings.metrics_addr,
                             settings.metrics_port)
    scheduler.install_signal_handlers()
    scheduler.run()
