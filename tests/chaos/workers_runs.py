"""R1 (worker ``kill -9`` mid-analysis) and R2 (Redis and PostgreSQL restarted mid-run).

Real Celery worker processes (``celery -A workers.celery_app worker``, started and killed by PID), the
real dispatcher (``monitor.dispatch.dispatch_once`` with its own Celery sender and broker-depth probe),
the real delivery runner against aiosmtpd. Each try is one analysis of the 2016-08-15 → 2017-07-06 pair of
the sample tile (clear-cuts well above the alert threshold) on an area of its own with its own recipient,
so every try must end with: the analysis ``done``, one set of findings (one summary, ordinals 0..n-1),
and exactly one alert email accepted by the SMTP server.

- lost: the analysis did not end ``done``, or its alert never arrived;
- duplicated: a second summary, a gap/repeat in the ordinals, or an alert accepted twice;
- tracebacks: an exception out of the dispatcher or the delivery runner outside a planned outage, or a
  task that escaped the worker's own handling (Celery's "raised unexpected").
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from core.config import Settings
from core.db import session_scope
from core.models import Delivery, Finding
from monitor.dispatch import dispatch_once
from monitor.reports import run_deliveries
from tests.chaos.lab import Lab, PrivatePostgres, Tally, truncate_app
from tests.chaos.mail import MailServer
from tests.fixtures_workers import (
    TERMINAL,
    RedisServer,
    WorkerProcess,
    analysis_rows,
    insert_analysis,
    insert_area,
    insert_sample_scenes,
    settings_env,
)

BEFORE, AFTER = "2016-08-15", "2017-07-06"
# Seconds the claim hook holds a claimed analysis; the pair's raster work takes about as long again here,
# so a kill drawn from 0 .. DELAY + 0.5 s lands in either phase.
DELAY = 0.5
# PostgreSQL outages of R2's tries in turn (seconds): shorter than the 6 s lease, a few leases, and the
# 45 s the manual run reached (every lease held during it expires).
DOWNTIMES = ((2.0, 8.0), (15.0, 25.0), (40.0, 45.0))
Log = Callable[[str], None]


class Run:
    """One run's world: settings, the sample pair, the worker of the moment, and the tally."""

    def __init__(self, lab: Lab, settings: Settings, workdir: Path, tally: Tally, log: Log):
        self.lab, self.settings, self.workdir, self.tally, self.log = lab, settings, workdir, tally, log
        truncate_app(settings.database_url)
        scenes = insert_sample_scenes(settings.catalogues[0], lab.cog_server.url, [BEFORE, AFTER], settings)
        self.scenes = scenes
        self.workers: list[WorkerProcess] = []
        self.expected: dict[int, str] = {}  # analysis id -> its area's one recipient
        self.bystanders: set[int] = set()  # checked like the others, but not a try (e.g. done before the kill)
        self.outage = False  # exceptions while a service is down on purpose are what the scheduler's guard absorbs

    def start_worker(self, delay: float) -> WorkerProcess:
        env = settings_env(self.settings)
        env["UNIRS_TEST_TASK_DELAY_SECONDS"] = str(delay)
        worker = WorkerProcess(env, self.workdir / f"worker-{len(self.workers)}.log")
        self.workers.append(worker)
        return worker.start()

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()

    def new_analysis(self, tag: str) -> int:
        recipient = f"{tag}@example.org"
        area_id = insert_area(self.scenes.footprint.buffer(-0.0006), name=f"chaos {tag}", recipients=[recipient],
                              settings=self.settings)
        analysis_id = insert_analysis(area_id, self.scenes.ids[AFTER], self.scenes.ids[BEFORE], settings=self.settings)
        self.expected[analysis_id] = recipient
        return analysis_id

    def guarded(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:
            if not self.outage:
                self.tally.tracebacks += 1
                self.tally.note(f"{what}: {type(exc).__name__}: {exc}")
            return None

    def rows(self, ids: list[int]) -> dict[int, dict[str, Any]] | None:
        return self.guarded("reading analyses", lambda: analysis_rows(ids, self.settings))

    def dispatch(self) -> None:
        self.guarded("dispatch_once", lambda: dispatch_once(self.settings))

    def wait_running(self, analysis_id: int, timeout: float = 120.0) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.dispatch()
            row = (self.rows([analysis_id]) or {}).get(analysis_id)
            if row and row["status"] == "running":
                return row
            time.sleep(0.2)
        return None

    def until_terminal(self, ids: list[int], timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.dispatch()
            rows = self.rows(ids)
            if rows and all(r["status"] in TERMINAL for r in rows.values()):
                return
            time.sleep(0.5)
        self.log(f"not terminal before the deadline: {self.rows(ids)}")

    def deliver(self) -> None:
        """Two delivery runs: the first sends the alerts, the second must find nothing left to send."""
        first = self.guarded("run_deliveries", lambda: run_deliveries(self.settings)) or {}
        later = self.guarded("run_deliveries", lambda: run_deliveries(self.settings)) or {}
        self.log(f"deliveries: first run {first}, second run sent {later.get('sent')}")

    def verify(self, mail: MailServer) -> None:
        """Score every expected analysis (see the module docstring)."""
        accepted = mail.accepted()
        rows = analysis_rows(list(self.expected), self.settings)
        with session_scope(self.settings) as session:
            summaries = dict(session.execute(select(Finding.analysis_id, func.count()).where(
                Finding.kind == "summary").group_by(Finding.analysis_id)).all())
            ordinals: dict[int, list[int]] = {}
            for aid, ordinal in session.execute(select(Finding.analysis_id, Finding.ordinal)
                                                .order_by(Finding.analysis_id, Finding.ordinal)):
                ordinals.setdefault(aid, []).append(ordinal)
            statuses = dict(session.execute(select(Delivery.analysis_id, func.array_agg(Delivery.status))
                                            .group_by(Delivery.analysis_id)).all())
        for aid, recipient in self.expected.items():
            row = rows.get(aid)
            if row is None:
                self.tally.lost += 1
                self.tally.note(f"analysis {aid}: its row is gone")
                continue
            mails = accepted[(f"analysis:{aid}", recipient)]
            seq = ordinals.get(aid, [])
            lost = row["status"] != "done" or mails == 0
            duplicated = summaries.get(aid, 0) > 1 or seq != list(range(len(seq))) or mails > 1
            self.tally.lost += lost
            self.tally.duplicated += duplicated
            if lost or duplicated:
                self.tally.note(f"analysis {aid}: {row['status']} after {row['attempts']} attempts "
                                f"({row['last_error']}), {summaries.get(aid, 0)} summaries, ordinals {seq}, "
                                f"{mails} alerts accepted, deliveries {statuses.get(aid)}")
            elif aid not in self.bystanders:
                self.tally.passed += 1
        for worker in self.workers:
            escaped = worker.log().count("raised unexpected")
            if escaped:
                self.tally.tracebacks += escaped
                self.tally.note(f"{worker.log_path.name}: {escaped} task(s) raised out of the worker")


def r1_worker_kills(lab: Lab, kills: int = 5, *, seed: int = 1, log: Log = print) -> Tally:
    """``kills`` analyses, each with its worker SIGKILLed while the row is ``running`` (in the claim hook's
    window or in the real raster work, at a random moment); a fresh worker takes over after the lease."""
    rng = random.Random(seed)
    tally = Tally()
    workdir = lab.workdir / "r1"
    workdir.mkdir(parents=True, exist_ok=True)
    with MailServer() as mail:
        run = Run(lab, lab.settings(smtp_port=mail.port), workdir, tally, log)
        try:
            worker = run.start_worker(delay=DELAY)
            attempts = 0
            while tally.tries < kills and attempts < 3 * kills:
                attempts += 1
                aid = run.new_analysis(f"r1-{attempts}")
                if run.wait_running(aid) is None:
                    tally.tries += 1
                    tally.note(f"analysis {aid} never claimed: {worker.log_tail(10)}")
                    continue
                time.sleep(rng.uniform(0.0, DELAY + 0.5))
                still = (run.rows([aid]) or {}).get(aid, {}).get("status")
                worker.kill9()
                if still != "running":
                    run.bystanders.add(aid)
                    log(f"R1 analysis {aid} was already {still} before the kill: not counted as a try")
                else:
                    tally.tries += 1
                    log(f"R1 kill {tally.tries}/{kills}: worker pid {worker.proc.pid} killed mid-analysis {aid}")
                worker = run.start_worker(delay=DELAY)
                run.until_terminal([aid])
            run.deliver()
            run.verify(mail)
        finally:
            run.stop_workers()
    return tally


def r2_service_restarts(lab: Lab, tries: int = 3, *, per_try: int = 3, seed: int = 2, log: Log = print) -> Tally:
    """Per try ``per_try`` analyses; while the first one runs, the private Redis is restarted (every
    message gone) and then the private PostgreSQL is stopped (fast or immediate shutdown, alternating) for
    :data:`DOWNTIMES` seconds with the dispatcher still calling, and started again. Counted per analysis."""
    rng = random.Random(seed)
    tally = Tally()
    workdir = lab.workdir / "r2"
    workdir.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(workdir)
    redis.start()
    try:
        with PrivatePostgres() as pg, MailServer() as mail:
            settings = lab.settings(database_url=pg.create_app_database(), broker_url=redis.url, smtp_port=mail.port)
            run = Run(lab, settings, workdir, tally, log)
            try:
                run.start_worker(delay=1.5)
                for n in range(tries):
                    ids = [run.new_analysis(f"r2-{n}-{k}") for k in range(per_try)]
                    tally.tries += per_try
                    run.wait_running(ids[0])
                    redis.restart()
                    log(f"R2 try {n + 1}: redis restarted (queued messages gone)")
                    time.sleep(rng.uniform(0.0, 1.5))
                    mode = ("fast", "immediate")[n % 2]
                    down = rng.uniform(*DOWNTIMES[n % len(DOWNTIMES)])
                    run.outage = True
                    pg.stop(mode)
                    log(f"R2 try {n + 1}: postgres stopped ({mode}) for {down:.1f} s")
                    end = time.monotonic() + down
                    while time.monotonic() < end:
                        run.dispatch()
                        time.sleep(0.5)
                    pg.start()
                    run.until_terminal(ids)
                    run.outage = False
                    run.dispatch()  # the database is back: a pass must work again
                run.deliver()
                run.verify(mail)
            finally:
                run.stop_workers()
    finally:
        redis.stop()
    return tally
