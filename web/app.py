"""The FastAPI application: ``create_app(settings)`` (``unirs-monitor serve`` runs it under uvicorn).

Routes: ``/api/…`` REST (OpenAPI at ``/api/docs`` and ``/api/openapi.json``), ``/ogc/…`` findings as
OGC API Features, ``/login`` and the map pages (web/pages.py), ``/unsubscribe/…``, ``/healthz``. Static
files (Leaflet, leaflet-geoman, swagger-ui: vendored under web/static/vendor by scripts/vendor-web, no
CDN) are served from ``/static``.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from starlette.middleware.sessions import SessionMiddleware

from core.config import Settings, get_settings
from core.db import session_scope

STATIC = Path(__file__).parent / "static"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="UniRS Monitor", version="1", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
        description="Watched areas, their acquisitions, analyses and findings. Authenticate with "
                    "`Authorization: Bearer unirs_…` (`unirs-monitor users token EMAIL`) or a browser login.",
    )
    app.state.settings = settings
    https = (settings.web.public_url or "").startswith("https://")
    app.add_middleware(
        SessionMiddleware, secret_key=settings.web.secret or secrets.token_urlsafe(32), session_cookie="unirs_session",
        max_age=int(settings.web.session_hours * 3600), same_site="lax", https_only=https,
    )

    from web import api_analyses, api_areas, api_webhooks, auth

    app.include_router(auth.router)
    app.include_router(api_areas.router)
    app.include_router(api_analyses.router)
    app.include_router(api_webhooks.router)
    for optional in ("ogc", "unsubscribe", "pages"):
        try:
            module = __import__(f"web.{optional}", fromlist=["router"])
        except ModuleNotFoundError as exc:
            if exc.name != f"web.{optional}":
                raise
            continue
        app.include_router(module.router)
        getattr(module, "install", lambda _app: None)(app)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        """Liveness and database reachability (the compose healthcheck)."""
        try:
            with session_scope(settings) as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            return JSONResponse({"status": "error", "database": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok"})

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
