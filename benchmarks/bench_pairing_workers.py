"""The Europe cycle's moving parts for bench_pairing: a private broker, real Celery worker processes and the
scheduler's dispatch + pairing loop, each running the code of one checkout (this one or an older revision's),
and the md5 of what a cycle settled (every observation and analysis) that both arms must agree on."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.config import Settings
from devtools import localstac
from devtools.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent


def start_workers(count: int, settings: Settings, workdir: Path, code: Path = REPO) -> list[subprocess.Popen]:
    """``count`` Celery worker programs (one pool process each) on the ``cpu`` queue, running the code in ``code``
    (a checkout: this one, or an older revision's); returns once all are ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIRS_")}
    env.update({"UNIRS_DATABASE_URL": settings.database_url, "UNIRS_BROKER_URL": settings.broker_url,
                "UNIRS_CATALOGUES": json.dumps([c.model_dump(mode="json") for c in settings.catalogues]),
                "UNIRS_LOG_LEVEL": "INFO", "PYTHONPATH": str(code)})
    procs, logs = [], []
    for k in range(count):
        log = workdir / f"worker-{k}.log"
        logs.append(log)
        with open(log, "ab") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--queues", "cpu",
                 "--concurrency", "1", "--loglevel", "INFO", "-n", f"bench-{k}-{os.getpid()}@%h", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                cwd=code, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True))
    deadline = time.monotonic() + 300
    while not all(" ready." in log.read_text(errors="replace") for log in logs if log.exists()) or \
            not all(log.exists() for log in logs):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise SystemExit(f"workers did not start; see {workdir}")
        time.sleep(0.2)
    return procs


def cycle_with_workers(settings: Settings, cogs: localstac.CogServer, count: int, code: Path = REPO
                       ) -> dict[str, float]:
    """Observations by ``count`` real worker processes and the dispatch + pairing loop of the scheduler's jobs (a
    process of its own), all running the code in ``code``; timed from the first dispatch until no observation is
    left pending (the last row written)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-pairing-workers-"))
    broker = RedisServer(workdir / "redis")  # the shared broker's 'cpu' queue has other consumers
    broker.start()
    settings = settings.model_copy(update={"broker_url": broker.url})
    procs: list[subprocess.Popen] = []
    try:
        procs = start_workers(count, settings, workdir, code)
        cpu0 = cpu_seconds(procs, settings)
        server0 = _process_cpu(cogs.proc.pid) if cogs.proc is not None else 0.0
        cogs.reset_stats()
        loop = subprocess.run([sys.executable, "-c", PAIRING_LOOP, settings.model_dump_json()], cwd=code, check=True,
                              capture_output=True, text=True, env={**{k: v for k, v in os.environ.items()
                                                                      if not k.startswith("UNIRS_")},
                                                                   "PYTHONPATH": str(code)}).stdout
        done = json.loads(loop.strip().splitlines()[-1])
        seconds, analyses, observed_at = done["seconds"], done["analyses"], done["observed_at"]
        passes, in_passes, longest = done["passes"], done["in_passes"], done["longest"]
        workers_cpu = cpu_seconds(procs, settings)[0] - cpu0[0]
        database_cpu = done["database_cpu"] - cpu0[1]  # sampled by the loop before its connections closed
        server_cpu = (_process_cpu(cogs.proc.pid) if cogs.proc is not None else 0.0) - server0
        requests = cogs.stats()["requests"]
        by_status = observation_counts(settings)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(60)
        broker.stop()
    reads = opens = busy = 0.0
    for log in workdir.glob("worker-*.log"):
        content = log.read_text(errors="replace")
        for m in re.finditer(r"(\d+) granule windows read from (\d+) files", content):
            reads, opens = reads + int(m[1]), opens + int(m[2])
        busy += sum(float(m[1]) for m in re.finditer(r"unirs\.observe\[[^]]+\] succeeded in ([0-9.]+)s", content))
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"  workers: every observation computed {observed_at:.1f} s after the first dispatch, the last pairing "
          f"{seconds:.1f} s; tasks ran {busy:.1f} worker-seconds in all; {passes} dispatch + pairing passes here took "
          f"{in_passes:.1f} s (longest {longest:.1f} s)")
    print(f"  CPU seconds (load-independent): worker processes {workers_cpu:.1f}, dispatch + pairing loop "
          f"{done['loop_cpu']:.1f}, database backends {database_cpu:.1f}; the COG server (not the service: it "
          f"stands for the catalogue's storage, one process) {server_cpu:.1f}")
    return {"observations": sum(by_status.values()), "clear": by_status.get("clear", 0), "analyses": analyses,
            "seconds": seconds, "requests": requests, "reads": int(reads), "opens": int(opens),
            "workers_cpu": workers_cpu, "loop_cpu": done["loop_cpu"], "database_cpu": database_cpu,
            "server_cpu": server_cpu}


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of one live process (Linux /proc), 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(procs: list[subprocess.Popen], settings: Settings) -> tuple[float, float]:
    """CPU seconds so far of the worker programs with their pool processes, and of the database backends
    connected to the arm's database (what the cycle costs whatever else runs on the machine; backends that
    closed before are not counted)."""
    import psycopg

    workers = 0.0
    for proc in procs:
        pids = [proc.pid]
        for task in Path(f"/proc/{proc.pid}/task").glob("*/children"):
            pids += [int(p) for p in task.read_text().split()]
        workers += sum(_process_cpu(p) for p in pids)
    dsn = settings.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        backends = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                               "AND pid <> pg_backend_pid()")]
    return workers, sum(_process_cpu(p) for p in backends)


def export_code(rev: str, target: Path) -> None:
    """The service's packages at git revision ``rev`` into ``target`` (what its worker processes run)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "core", "eo", "monitor", "workers", "model"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)


def outcome_digest(settings: Settings) -> tuple[str, str]:
    """md5 of every observation (area, acquisition, status, fractions, reason, scene) and of every analysis
    (area, after and before scene, pairing reason, idempotency key), in key order: what both arms must agree on."""
    import hashlib

    from sqlalchemy import text

    from core.db import session_scope

    with session_scope(settings) as session:
        observations = session.execute(text(
            "SELECT area_id, acquisition_id, status::text, covered_fraction, clear_fraction, reason, scene_id "
            "FROM observations ORDER BY area_id, acquisition_id")).all()
        analyses = session.execute(text(
            "SELECT area_id, after_scene_id, before_scene_id, pair_reason, idempotency_key FROM analyses "
            "ORDER BY idempotency_key")).all()
    return (hashlib.md5(repr([tuple(r) for r in observations]).encode()).hexdigest(),
            hashlib.md5(repr([tuple(r) for r in analyses]).encode()).hexdigest())


def observation_counts(settings: Settings) -> dict[str, int]:
    from sqlalchemy import text

    from core.db import session_scope

    with session_scope(settings) as session:
        return dict(session.execute(text("SELECT status::text, count(*) FROM observations GROUP BY 1")).all())


# The scheduler's dispatch + pairing passes, back to back, until no observation is left pending (run with the
# arm's code on its path, so a change to pairing is measured with the workers that go with it).
PAIRING_LOOP = """
import json, os, sys, time
from sqlalchemy import text
from core.config import Settings
from core.db import session_scope
from monitor.observations import celery_sender
from monitor.pairing import process_pending
settings = Settings.model_validate_json(sys.argv[1])
send = celery_sender(settings)
analyses, observed_at, passes, in_passes, longest = 0, None, 0, 0.0, 0.0
t0, cpu0 = time.monotonic(), time.process_time()
while True:
    t1 = time.monotonic()
    analyses += process_pending(settings, send_observations=send).analyses_created
    took = time.monotonic() - t1
    passes, in_passes, longest = passes + 1, in_passes + took, max(longest, took)
    with session_scope(settings) as session:
        uncomputed, pending = session.execute(text(
            "SELECT count(*) FILTER (WHERE computed_at IS NULL), count(*) FROM observations "
            "WHERE status = 'pending'")).one()
    if observed_at is None and not uncomputed:
        observed_at = time.monotonic() - t0
    if not pending:
        break
    time.sleep(0.25)
# Every backend of the database while this loop's and the workers' connections are still open.
with session_scope(settings) as session:
    backends = [r[0] for r in session.execute(text(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"))]
tick = os.sysconf("SC_CLK_TCK")
database_cpu = 0.0
for pid in backends:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    database_cpu += (int(fields[11]) + int(fields[12])) / tick
print(json.dumps({"seconds": time.monotonic() - t0, "analyses": analyses, "observed_at": observed_at,
                  "passes": passes, "in_passes": in_passes, "longest": longest,
                  "loop_cpu": time.process_time() - cpu0, "database_cpu": database_cpu}))
"""
