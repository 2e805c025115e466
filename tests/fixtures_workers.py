"""Fixtures for the analysis workers (pytest plugin module, registered in tests/conftest.py).

- ``worker_redis``: a dedicated ``redis-server`` on a free loopback port (no persistence, so a restart
  really loses every message), so tests can restart "the broker" without disturbing anyone else's Redis.
- ``worker_settings``: settings for the test broker, a short lease (6 s, heartbeat 1 s) and a loopback
  catalogue for the sample COG server (the explicit opt-in to http + 127.0.0.1 production never has).
- ``start_worker``: factory starting ``celery -A workers.celery_app worker`` as a real subprocess with
  that environment (plus any extra variables, e.g. the test-only ``UNIRS_TEST_TASK_DELAY_SECONDS``);
  every worker started is stopped at the end of the test.
- ``send_task``: publish like the dispatcher does, to the test broker.
- helpers to insert the sample scenes, an area and analyses rows directly, and to wait for outcomes.

Deadlines below only bound how long we wait for processes; no test asserts on elapsed time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from geoalchemy2.shape import from_shape
from shapely.geometry import MultiPolygon, shape
from shapely.geometry.base import BaseGeometry
from sqlalchemy import text

from core.config import AnalysisSettings, CatalogueSettings, Settings, get_settings
from core.db import session_scope
from core.models import Area, Observation, ObservationStatus
from devtools import localstac
from devtools.redis_server import RedisServer
from devtools.redis_server import pdeathsig as _pdeathsig
from monitor.catalogues.items import parse_item
from monitor.catalogues.store import upsert_catalogue, upsert_scene

ROOT = Path(__file__).resolve().parent.parent
LEASE_SECONDS = 6
TERMINAL = ("done", "skipped", "failed")
APP_TABLES = ("finding_images, findings, deliveries, digests, analyses, observations, quarantined_items, scenes, "
              "acquisitions, poll_states, catalogues, areas")


@pytest.fixture(scope="session")
def worker_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def loopback_catalogue(url: str) -> CatalogueSettings:
    return CatalogueSettings(name="local-cogs", url=url, allowed_schemes=["http"], allowed_hosts=["127.0.0.1"],
                             allow_private_hosts=True, timeout_seconds=10.0)


@pytest.fixture(scope="session")
def worker_settings(database_url: str, worker_redis: RedisServer, cog_server: localstac.CogServer) -> Settings:
    return Settings(
        database_url=database_url, broker_url=worker_redis.url,
        catalogues=[loopback_catalogue(cog_server.url)],
        analysis=AnalysisSettings(lease_seconds=LEASE_SECONDS, heartbeat_seconds=1, max_attempts=3),
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The UNIRS_* variables a subprocess needs to see ``settings``."""
    env = {
        "UNIRS_DATABASE_URL": settings.database_url,
        "UNIRS_BROKER_URL": settings.broker_url,
        "UNIRS_CATALOGUES": json.dumps([c.model_dump(mode="json") for c in settings.catalogues]),
        "UNIRS_ANALYSIS__LEASE_SECONDS": str(settings.analysis.lease_seconds),
        "UNIRS_ANALYSIS__HEARTBEAT_SECONDS": str(settings.analysis.heartbeat_seconds),
        "UNIRS_ANALYSIS__MAX_ATTEMPTS": str(settings.analysis.max_attempts),
        "UNIRS_LOG_LEVEL": "INFO",
    }
    if settings.model.weights_path is not None:
        env["UNIRS_MODEL__WEIGHTS_PATH"] = str(settings.model.weights_path)
    return env


class WorkerProcess:
    """``celery -A workers.celery_app worker`` in its own process group, log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, queues: str = "cpu", pool: str = "prefork"):
        self.env = env
        self.log_path = log_path
        self.queues = queues
        self.pool = pool
        self.name = f"test-{uuid.uuid4().hex[:6]}@%h"
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 120.0) -> WorkerProcess:
        cmd = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--queues", self.queues,
               "--pool", self.pool, "--concurrency", "1", "--loglevel", "INFO", "-n", self.name,
               "--without-gossip", "--without-mingle", "--without-heartbeat"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNIRS_")}
        env.update(self.env)
        env["UNIRS_WORKER_QUEUES"] = self.queues
        env["PYTHONPATH"] = str(ROOT)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_pdeathsig)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            if " ready." in self.log():
                return self
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {ready_timeout} s:\n{self.log_tail()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def kill9(self) -> None:
        """SIGKILL the whole worker (main process and pool children): no cleanup, no ack, no requeue."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass


@pytest.fixture
def start_worker(worker_settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(extra_env: dict[str, str] | None = None, settings: Settings | None = None, queues: str = "cpu",
              pool: str = "prefork") -> WorkerProcess:
        env = settings_env(settings or worker_settings)
        env.update(extra_env or {})
        worker = WorkerProcess(env, tmp_path / f"worker-{len(started)}.log", queues=queues, pool=pool)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def send_task(worker_redis: RedisServer) -> Callable[[int, str], None]:
    """Publish ``unirs.analyse(id)`` to the test broker, as monitor.dispatch does."""
    from celery import Celery

    from workers.celery_app import TASK_NAME

    app = Celery("unirs-test-sender", broker=worker_redis.url)
    app.conf.broker_connection_retry_on_startup = True

    def send(analysis_id: int, queue: str) -> None:
        app.send_task(TASK_NAME, args=[analysis_id], queue=queue, retry=True,
                      retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1})

    return send


# --- rows ------------------------------------------------------------------------------------------


def truncate(database_url: str) -> None:
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {APP_TABLES} RESTART IDENTITY CASCADE")


@dataclass
class SampleScenes:
    catalogue: CatalogueSettings
    ids: dict[str, int]  # date "2020-08-29" -> scene id
    footprint: BaseGeometry


def insert_sample_scenes(catalogue: CatalogueSettings, cog_url: str, dates: list[str],
                         settings: Settings | None = None, data_dir: Path | None = None) -> SampleScenes:
    """Scene rows from the committed sample items (or those of ``data_dir``, e.g. the all-dates build),
    hrefs pointing at the COG server (via the ingest code)."""
    items = {it["properties"]["datetime"][:10]: it
             for it in (localstac.read_sample_items(data_dir) if data_dir else localstac.read_sample_items())}
    ids: dict[str, int] = {}
    with session_scope(settings or get_settings()) as session:
        cat_id = upsert_catalogue(session, catalogue)
        for date in dates:
            item = localstac.rewrite_asset_hrefs(items[date], cog_url)
            item["collection"] = "sentinel-2-l2a"
            parsed = parse_item(item, catalogue)
            scene_id, _ = upsert_scene(session, cat_id, "sentinel-2-l2a", parsed, item)
            ids[date] = scene_id
    footprint = shape(items[dates[0]]["geometry"])
    return SampleScenes(catalogue, ids, footprint)


def insert_scene_copy(scene_id: int, *, suffix: str, assets: dict[str, Any]) -> int:
    """A copy of a scene row, as the only granule of an acquisition of its own (so it is not mosaicked with
    the original), with some assets replaced (corrupt/hostile)."""
    with session_scope(get_settings()) as session:
        row = session.execute(
            text("""
                WITH acq AS (
                    INSERT INTO acquisitions (key, platform, sensed_at, relative_orbit)
                    SELECT a.key || :suffix, a.platform, a.sensed_at, a.relative_orbit
                      FROM acquisitions a JOIN scenes s ON s.acquisition_id = a.id WHERE s.id = :id
                    RETURNING id)
                INSERT INTO scenes (catalogue_id, collection, acquisition_id, acquisition_key, granule_key, item_id,
                                    version_rank, platform, tile,
                                    relative_orbit, acquired_at, cloud_cover, processing_baseline, footprint, assets,
                                    item, versions_seen)
                SELECT catalogue_id, collection, (SELECT id FROM acq), acquisition_key || :suffix,
                       granule_key || :suffix,
                       item_id || :suffix, version_rank,
                       platform, tile, relative_orbit, acquired_at, cloud_cover, processing_baseline, footprint,
                       assets || CAST(:assets AS jsonb), item, 1
                  FROM scenes WHERE id = :id
             RETURNING id"""),
            {"suffix": suffix, "assets": json.dumps(assets), "id": scene_id},
        ).scalar_one()
    return row


def insert_area(geom: BaseGeometry, name: str | None = None, questions: list[str] | None = None,
                recipients: list[str] | None = None, settings: Settings | None = None) -> int:
    from monitor.geometry import geodesic_area_km2

    multi = geom if isinstance(geom, MultiPolygon) else MultiPolygon([geom])
    with session_scope(settings or get_settings()) as session:
        area = Area(name=name or f"area-{uuid.uuid4().hex[:6]}", geom=from_shape(multi, srid=4326),
                    area_km2=geodesic_area_km2(multi), recipients=recipients or [], questions=questions or [],
                    collections=["sentinel-2-l2a"], properties={})
        session.add(area)
        session.flush()
        return area.id


def insert_observation(area_id: int, scene_id: int, clear: float = 1.0) -> None:
    from core.models import Scene

    with session_scope(get_settings()) as session:
        acquisition_id = session.get(Scene, scene_id).acquisition_id
        session.add(Observation(area_id=area_id, acquisition_id=acquisition_id, scene_id=scene_id,
                                covered_fraction=1.0, clear_fraction=clear, status=ObservationStatus.CLEAR))


def insert_analysis(area_id: int, after_id: int, before_id: int | None, analyser: str = "spectral@1",
                    question_set: str = "@1", settings: Settings | None = None) -> int:
    from core import jobs

    with session_scope(settings or get_settings()) as session:
        return jobs.create_pending(session, idempotency_key=uuid.uuid4().hex, area_id=area_id,
                                   after_scene_id=after_id, before_scene_id=before_id,
                                   analyser=jobs.AnalyserSpec.parse(analyser), question_set=question_set,
                                   pairing_policy="latest", pair_reason="inserted by the test")


def analysis_rows(ids: list[int], settings: Settings | None = None) -> dict[int, dict[str, Any]]:
    with session_scope(settings or get_settings()) as session:
        rows = session.execute(
            text(
                "SELECT id, status::text AS status, attempts, worker, last_error, stats, analyser, analyser_run "
                "FROM analyses "
                "WHERE id = ANY(:ids)"), {"ids": ids}).mappings().all()
    return {r["id"]: dict(r) for r in rows}


def run_until_terminal(ids: list[int], settings: Settings, send: Callable[[int, str], None], *,
                       timeout: float = 180.0, workers: list[WorkerProcess] | None = None,
                       poll: float = 0.5) -> dict[int, dict[str, Any]]:
    """Call the real dispatcher in a loop until every analysis is done/skipped/failed (or the deadline)."""
    from monitor.dispatch import dispatch_once

    deadline = time.monotonic() + timeout
    while True:
        dispatch_once(settings, send=send)
        rows = analysis_rows(ids, settings)
        if all(r["status"] in TERMINAL for r in rows.values()):
            return rows
        if time.monotonic() > deadline:
            logs = "\n".join(w.log_tail() for w in workers or [])
            raise AssertionError(f"analyses not finished before the deadline: {rows}\n--- worker logs ---\n{logs}")
        time.sleep(poll)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")
