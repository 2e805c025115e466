"""`unirs-monitor health scheduler|worker`: container health checks (Docker ``HEALTHCHECK``, Kubernetes probes).

Each prints one line and exits 0 (healthy) or 1 (not), within a few seconds, and never retries: the
orchestrator calls it again. They run inside the container of the process they check.

- ``scheduler``: the database answers, its schema is the code's, and *some* scheduler holds the leader
  lock (a stand-by is healthy while another one leads; nobody leading means the schedulers are stuck);
  with ``metrics_port`` set, this container's metrics endpoint answers too (the process is alive).
- ``worker``: the Celery worker of this host answers a broadcast ``ping`` on the broker (Celery remote
  control, https://docs.celeryq.dev/en/stable/userguide/monitoring.html#ping); with ``--require-cuda`` a
  CUDA device must also be visible (a GPU worker without its GPU would run the spectral analyser only).
"""

from __future__ import annotations

import socket
import urllib.request
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # annotations only: importing the settings module is slow, and `-h` needs none
    from core.config import Settings

TIMEOUT_SECONDS = 5.0


class Unhealthy(RuntimeError):
    """What is wrong, in one line."""


def scheduler_health(settings: Settings) -> str:
    import psycopg

    from core.migrate import require_current
    from monitor.locks import LEADER_LOCK, libpq_url, lock_key

    require_current(settings.database_url)
    # Advisory lock keys are bigints split into (classid, objid) halves in pg_locks.
    key = lock_key(LEADER_LOCK) & 0xFFFFFFFFFFFFFFFF
    with psycopg.connect(libpq_url(settings.database_url), connect_timeout=int(TIMEOUT_SECONDS)) as conn:
        leaders = conn.execute(
            # Advisory locks are per database: other deployments on the same server do not count.
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid = %s::bigint::oid AND objid = %s::bigint::oid",
            (key >> 32, key & 0xFFFFFFFF),
        ).fetchone()[0]
    if not leaders:
        raise Unhealthy("no scheduler holds the leader lock (none running, or all stuck before leading)")
    detail = "database and schema OK, a leader is running"
    if settings.metrics_port is not None:
        url = f"http://127.0.0.1:{settings.metrics_port}/"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as resp:  # loopback: this container
                resp.read(1)
        except OSError as exc:
            reason = getattr(exc, "reason", None) or exc
            raise Unhealthy(f"this scheduler's metrics endpoint {url} does not answer: {reason}") from None
        detail += f", metrics served on {url}"
    return detail


def worker_node_name(hostname: str | None) -> str:
    """Celery's node name for ``--hostname`` (``%h`` = this host), ``celery@<host>`` by default."""
    host = socket.gethostname()
    return (hostname or "celery@%h").replace("%h", host).replace("%n", host.split(".")[0])


def worker_health(settings: Settings, hostname: str | None, require_cuda: bool) -> str:
    from celery import Celery

    node = worker_node_name(hostname)
    app = Celery("unirs-health", broker=settings.broker_url)
    app.conf.update(broker_connection_retry_on_startup=False, broker_connection_max_retries=0,
                    broker_connection_timeout=TIMEOUT_SECONDS)
    try:
        replies = app.control.ping(destination=[node], timeout=TIMEOUT_SECONDS)
    except Exception as exc:  # kombu raises several types for an unreachable broker
        raise Unhealthy(f"broker {settings.broker_url} unreachable: {exc}") from None
    finally:
        app.close()
    if not any(node in reply for reply in replies):
        raise Unhealthy(f"worker {node} did not answer a ping within {TIMEOUT_SECONDS:g} s")
    detail = f"worker {node} answers"
    if require_cuda:
        import torch

        if not torch.cuda.is_available():
            build = torch.version.cuda or "none (CPU-only torch build)"
            raise Unhealthy(f"no CUDA device visible (torch {torch.__version__}, CUDA {build})")
        detail += f", CUDA device {torch.cuda.get_device_name(0)}"
    return detail


def _report(fn) -> None:
    try:
        click.echo(f"healthy: {fn()}")
    except Unhealthy as exc:
        click.echo(f"unhealthy: {exc}", err=True)
        raise SystemExit(1) from None
    except Exception as exc:  # a health check reports, it never prints a traceback
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"unhealthy: {type(exc).__name__}: {reason}", err=True)
        raise SystemExit(1) from None


@click.group("health")
def health() -> None:
    """Health checks for containers: one line, exit status 0 (healthy) or 1."""


@health.command("scheduler")
def health_scheduler() -> None:
    """Database + schema reachable, a leader running, this process's metrics answering (if served)."""
    _report(lambda: scheduler_health(click.get_current_context().find_root().obj))


@health.command("worker")
@click.option("--hostname", "-n", default=None,
              help="The worker's node name as given to `worker --hostname` (default celery@<this host>).")
@click.option("--require-cuda", is_flag=True, help="Also require a visible CUDA device (GPU workers).")
def health_worker(hostname: str | None, require_cuda: bool) -> None:
    """The Celery worker on this host answers a ping over the broker."""
    _report(lambda: worker_health(click.get_current_context().find_root().obj, hostname, require_cuda))
