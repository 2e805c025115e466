"""`unirs-monitor metrics`: print or serve the Prometheus metrics of monitor/metrics.py.

Apart from that module so `metrics -h` does not load prometheus_client and the database layer.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from core.config import Settings


@click.command("metrics")
@click.option("--serve", "port", type=int, default=None, metavar="PORT",
              help="Serve /metrics on PORT until stopped instead of printing once.")
@click.option("--addr", default=None, help="Address to bind with --serve (default: UNIRS_METRICS_ADDR, 127.0.0.1).")
@click.pass_obj
def metrics(settings: Settings, port: int | None, addr: str | None) -> None:
    """Print the Prometheus metrics (read from the database) once, or serve them with --serve PORT.

    The printed text suits node_exporter's textfile collector. The scheduler serves the same metrics
    itself when UNIRS_METRICS_PORT is set.
    """
    from monitor.metrics import exposition, serve

    if port is None:
        click.echo(exposition(settings).decode(), nl=False)
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        server = serve(port, addr or settings.metrics_addr, settings)
    except OSError as exc:
        raise click.ClickException(f"cannot serve metrics on {addr or settings.metrics_addr}:{port}: {exc}") from None
    click.echo(f"serving metrics on http://{addr or settings.metrics_addr}:{port}/metrics", err=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()
