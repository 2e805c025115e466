"""The map pages of the web app (browser session only; an API token does not log a page in).

``/`` the caller's areas on a map, drawing (leaflet-geoman) or uploading a GeoJSON area with its
thresholds and recipients; ``/areas/{id}`` its settings and timeline of acquisitions (clear / cloudy /
not covered and why, which pair was analysed and why); ``/analyses/{id}`` the before/after swipe of the
stored thumbnails, the change regions coloured by class, caption and Q&A; ``/findings`` the findings
table with GeoJSON/CSV export. The pages read the same functions as the REST API and change things
only through it (the page's fetch() calls carry the session's CSRF token), so an access rule holds for
both. Another user's area or analysis is "not found", as in the API. Everything the page shows is
escaped: Jinja2 autoescaping on the server, ``textContent`` in web/static/app.js.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.models import Analysis, Area, Scene
from eo.change_classes import CLASS_ORDER, format_hectares, label
from monitor import findings as fq
from monitor.reports.context import NOT_A_CHANGE
from web import api_analyses, api_areas
from web.deps import DB, Principal, optional_principal, owned
from web.templating import render

router = APIRouter(include_in_schema=False)

VENDOR = "/static/vendor"
# How many acquisitions the area page lists (newest first); the API pages through the rest.
TIMELINE_ROWS = 300
FINDINGS_ROWS = 500
# Words that mark an observation as "not covered" (the granule does not image the area), whatever its
# stored status: coverage is a different answer from "cloudy" to "why no alert?".
_NOT_COVERED = ("not covered", "not imaged", "outside the", "no coverage", "does not cover")


class _LoginFirst(Exception):
    pass


def page_user(request: Request, session: Session = DB) -> Principal:
    who = optional_principal(request, session)
    if who is None or who.via != "session":
        raise _LoginFirst(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return who


def login_redirect(request: Request, exc: _LoginFirst) -> RedirectResponse:
    return RedirectResponse(f"/login?next={quote(str(exc), safe='/')}", status_code=303)


def _not_found(request: Request, exc: HTTPException):
    return render(request, "notfound.html", {"detail": exc.detail}, status_code=404)


def observation_kind(status: str, reason: str | None) -> str:
    """clear | cloudy | not covered | failed | pending — the timeline's badge."""
    if reason and any(word in reason.lower() for word in _NOT_COVERED):
        return "not covered"
    return status.replace("_", " ")


@router.get("/")
def index(request: Request, added: list[int] = Query([]), who: Principal = Depends(page_user),
          session: Session = DB):
    areas = api_areas.list_areas(status=None, who=who, session=session)
    counts = dict(session.execute(
        owned(select(Analysis.area_id, func.count()).join(Area, Area.id == Analysis.area_id)
              .group_by(Analysis.area_id), who)).all())
    # ?added=ID&added=ID...: the areas the form just created (a file may hold several), in that order.
    names = {f["id"]: f["properties"]["name"] for f in areas["features"]}
    added_names = [names[i] for i in dict.fromkeys(added) if i in names]
    return render(request, "index.html", {"areas": areas, "analysis_counts": counts, "added": added_names,
                                          "defaults": api_areas.NEW_AREA_DEFAULTS})


@router.get("/areas/{area_id}")
def area_page(request: Request, area_id: int, who: Principal = Depends(page_user), session: Session = DB):
    try:
        feature = api_areas.get_area(area_id, who=who, session=session)
    except HTTPException as exc:
        return _not_found(request, exc)
    timeline = api_areas.observations(area_id, limit=TIMELINE_ROWS, offset=0, who=who, session=session)
    for row in timeline:
        row["kind"] = observation_kind(row["status"], row["reason"])
    analyses = api_analyses.area_analyses(area_id, limit=TIMELINE_ROWS, offset=0, who=who, session=session)
    scenes = _scene_dates(session, {a["before_scene_id"] for a in analyses} | {a["after_scene_id"] for a in analyses})
    return render(request, "area.html", {"area": feature, "timeline": timeline, "analyses": analyses,
                                         "scenes": scenes})


def _scene_dates(session: Session, ids: set[int | None]) -> dict[int, str]:
    wanted = [i for i in ids if i is not None]
    if not wanted:
        return {}
    rows = session.execute(select(Scene.id, Scene.acquired_at).where(Scene.id.in_(wanted)))
    return {sid: at.strftime("%Y-%m-%d") for sid, at in rows}


@router.get("/analyses/{analysis_id}")
def analysis_page(request: Request, analysis_id: int, who: Principal = Depends(page_user),
                  session: Session = DB):
    try:
        report = api_analyses.analysis(analysis_id, who=who, session=session)
    except HTTPException as exc:
        return _not_found(request, exc)
    area = api_areas.get_area(report["area_id"], who=who, session=session)
    # Dismissed or screened-out regions (a cloud edge: atmospheric) are listed in the table with their state
    # but not drawn: on the map every region has its class's colour, and a red one reads as a loss.
    features = report["regions_geojson"]["features"]
    drawn = [f for f in features if f["properties"].get("alert_state") not in NOT_A_CHANGE]
    return render(request, "analysis.html", {
        "r": report, "area": area, "ha": format_hectares, "label": label, "not_a_change": NOT_A_CHANGE,
        "undrawn": len(features) - len(drawn),
        "map_data": {"area": area, "regions": drawn, "classes": list(CLASS_ORDER),
                     "placed": {role: report["placed_images"][role] for role in ("before", "after")
                                if role in report["placed_images"]}},
    })


@router.get("/findings")
def findings_page(request: Request, area_id: int | None = None, kind: str | None = None,
                  who: Principal = Depends(page_user), session: Session = DB):
    kind = kind if kind in fq.KINDS else None
    stmt = owned(fq.build_statement(fq.FindingFilter(kind=kind, limit=FINDINGS_ROWS)), who)
    if area_id is not None:
        stmt = stmt.where(Area.id == area_id)
    rows = session.execute(stmt).mappings().all()
    areas = session.execute(owned(select(Area.id, Area.name).order_by(Area.name), who)).all()
    query = "&".join(f"{k}={quote(str(v))}" for k, v in (("area_id", area_id), ("kind", kind)) if v)
    return render(request, "findings.html", {
        "rows": rows, "areas": areas, "area_id": area_id, "kind": kind or "", "label": label,
        "ha": format_hectares, "limit": FINDINGS_ROWS, "not_a_change": NOT_A_CHANGE,
        "export": {fmt: f"/api/findings?format={fmt}" + (f"&{query}" if query else "") for fmt in ("geojson", "csv")},
    })


def swagger_ui(request: Request) -> HTMLResponse:
    """/api/docs from the vendored swagger-ui-dist (no CDN); the online validator badge is off because it
    would send the spec's URL to validator.swagger.io."""
    app = request.app
    return get_swagger_ui_html(
        openapi_url=app.openapi_url, title=f"{app.title} · API",
        swagger_js_url=f"{VENDOR}/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{VENDOR}/swagger-ui/swagger-ui.css",
        swagger_favicon_url=f"{VENDOR}/swagger-ui/favicon-32x32.png", swagger_ui_parameters={"validatorUrl": None},
    )


def install(app: Any) -> None:
    """Handlers the pages need on the app itself: login redirect and the vendored API docs."""
    app.add_exception_handler(_LoginFirst, login_redirect)
    app.add_api_route("/api/docs", swagger_ui, methods=["GET"], include_in_schema=False)
    app.add_api_route("/docs", lambda: RedirectResponse("/api/docs"), methods=["GET"], include_in_schema=False)
