"""Jinja2 pages (autoescaped: area names, captions and answers are user or model text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates

from web.deps import csrf_token

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200):
    web = request.app.state.settings.web
    base = {"csrf": csrf_token(request), "basemap_url": web.basemap_url,
            "basemap_attribution": web.basemap_attribution, "user_email": request.session.get("email")}
    return TEMPLATES.TemplateResponse(request, name, {**base, **context}, status_code=status_code)
