"""Jinja2 pages (autoescaped: area names, captions and answers are user or model text).

Every page carries a Content-Security-Policy: scripts, styles and data from this app only (the vendored
Leaflet and leaflet-geoman, web/static/app.js; no inline script), images also from the configured
basemap's tile host. An injected ``<script>`` in a name or a model answer would not run even if escaping
failed somewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.templating import Jinja2Templates

from web.deps import csrf_token

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def tile_origin(basemap_url: str) -> str:
    """The CSP source of a Leaflet tile URL template: ``https://{s}.tile.example.org/{z}/{x}/{y}.png`` →
    ``https://*.tile.example.org``; "" for no basemap or a template without scheme and host."""
    parts = urlsplit(basemap_url or "")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return ""
    host = parts.netloc.replace("{s}", "*")
    return f"{parts.scheme}://{host}" if "{" not in host else ""


def content_security_policy(basemap_url: str) -> str:
    tiles = tile_origin(basemap_url)
    return ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            f"img-src 'self' data: blob:{' ' + tiles if tiles else ''}; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'")


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200):
    web = request.app.state.settings.web
    base = {"csrf": csrf_token(request), "basemap_url": web.basemap_url,
            "basemap_attribution": web.basemap_attribution, "user_email": request.session.get("email")}
    response = TEMPLATES.TemplateResponse(request, name, {**base, **context}, status_code=status_code)
    response.headers["Content-Security-Policy"] = content_security_policy(web.basemap_url)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    return response
