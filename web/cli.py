"""`unirs-monitor serve`: the web app and HTTP API under uvicorn."""

from __future__ import annotations

import click


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--host", default=None, help="Bind address (default UNIRS_WEB__HOST, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default UNIRS_WEB__PORT, 8080).")
@click.option("--workers", type=int, default=1, show_default=True, help="uvicorn worker processes.")
def serve(host: str | None, port: int | None, workers: int) -> None:
    """Serve the web app and HTTP API (OpenAPI docs at /api/docs). Stateless: run as many replicas as you like
    behind a proxy, with the same UNIRS_WEB__SECRET."""
    import uvicorn

    from core.config import get_settings

    settings = get_settings()
    if not settings.web.secret and workers > 1:
        raise click.ClickException("several workers need a shared UNIRS_WEB__SECRET (sessions, unsubscribe links)")
    uvicorn.run("web.app:create_app", factory=True, host=host or settings.web.host, port=port or settings.web.port,
                workers=workers, proxy_headers=True, log_level=(settings.log_level or "info").lower())
