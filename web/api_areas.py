"""REST API of watched areas: CRUD from GeoJSON with the CLI's validation (monitor/areas.py,
monitor/geometry.py) and its messages, pause/resume, recipients, question set, observations.

Output is RFC 7946 GeoJSON: WGS84 lon/lat, exterior rings counter-clockwise, holes clockwise.
Refusals answer 422 with ``{"detail": "<the CLI's one-line message>"}``, naming this API's query
parameters where the CLI's name its flags (:data:`API_HINTS`).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Response
from shapely.geometry import MultiPolygon, mapping
from shapely.geometry.polygon import orient
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import Settings
from core.models import Analysis, Area, AreaStatus, Observation, Scene, Unsubscribe
from eo.questions import load_templates
from monitor import areas as svc
from monitor.geometry import AreaGeometryError, Problem, parse_areas
from web.deps import DB, Principal, owned, owned_area, principal, settings_of

router = APIRouter(prefix="/api", tags=["areas"])

EXAMPLE = {
    "type": "Feature",
    "properties": {"name": "Apuseni forest", "recipients": ["me@example.org"], "max_cloud_cover": 60,
                   "min_clear_fraction": 0.8, "alert_frequency": "immediate", "min_alert_hectares": 0.5},
    "geometry": {"type": "Polygon", "coordinates": [[[23.1, 46.5], [23.2, 46.5], [23.2, 46.6], [23.1, 46.6],
                                                     [23.1, 46.5]]]},
}


# monitor.areas.CLI_HINTS in this API's terms: ``POST /api/areas`` query parameters (no ``--name-property``
# here). PATCH has no ``name``-per-feature batch nor ``keep_unknown_properties``: its refusals offer neither.
API_HINTS = {"name": "?name=", "union": "?union=true", "keep_unknown": "?keep_unknown_properties=true",
             "name_key": None, "fix": "?fix=true"}
PATCH_HINTS = {"name": None, "union": None, "keep_unknown": None, "name_key": None, "fix": "?fix=true"}
# The thresholds a new area gets when neither its feature nor the request sets them: the Area columns'
# defaults, which `areas add` uses too (the web form shows them, rather than numbers of its own).
NEW_AREA_DEFAULTS = {key: Area.__table__.c[key].default.arg for key in ("max_cloud_cover", "min_clear_fraction")}


def rfc7946(geom: MultiPolygon) -> dict[str, Any]:
    """RFC 7946 §3.1.6: exterior rings counter-clockwise, interior rings clockwise."""
    return mapping(MultiPolygon([orient(p, 1.0) for p in geom.geoms]))


def area_feature(session: Session, area: Area) -> dict[str, Any]:
    props = svc.area_properties(area)
    props["owner_id"] = area.owner_id
    props["unsubscribed"] = list(session.scalars(
        select(Unsubscribe.recipient).where(Unsubscribe.area_id == area.id).order_by(Unsubscribe.recipient)
    ))
    return {"type": "Feature", "id": area.id, "geometry": rfc7946(svc.area_geometry(area)), "properties": props}


def _refused(exc: Exception) -> HTTPException:
    return HTTPException(422, str(exc))


@router.get("/areas")
def list_areas(status: str | None = Query(None, pattern="^(active|paused)$"), who: Principal = Depends(principal),
               session: Session = DB) -> dict[str, Any]:
    """Your watched areas as a GeoJSON FeatureCollection (admins: every area)."""
    stmt = select(Area).order_by(Area.name)
    if status:
        stmt = stmt.where(Area.status == AreaStatus(status))
    return {"type": "FeatureCollection",
            "features": [area_feature(session, a) for a in session.scalars(owned(stmt, who))]}


@router.post("/areas", status_code=201)
def create_areas(body: Any = Body(..., examples=[EXAMPLE]), name: str | None = None, union: bool = False,
                 fix: bool = False, keep_unknown_properties: bool = False, who: Principal = Depends(principal),
                 session: Session = DB, settings: Settings = Depends(settings_of)) -> dict[str, Any]:
    """Add area(s) from GeoJSON (Geometry, Feature, FeatureCollection: one area per feature, named by
    ``properties.name`` or ``?name=``). Properties set thresholds and recipients as in ``areas export``.
    Other properties are refused unless ``?keep_unknown_properties=true``. All or nothing."""
    try:
        problems: list[Problem] = []  # every bad feature, in one 422 (one line each)
        parsed = parse_areas(json.dumps(body), union=union, fix=fix, max_vertices=settings.max_area_vertices,
                             problems=problems, fix_hint=API_HINTS["fix"])
        created = svc.add_areas(session, parsed, name, svc.AreaOptions(), max_area_km2=settings.max_area_km2,
                                keep_unknown=keep_unknown_properties, owner_id=who.user_id, problems=problems,
                                union=union, hints=API_HINTS)
    except (svc.AreaError, AreaGeometryError) as exc:
        raise _refused(exc) from None
    return {"type": "FeatureCollection", "features": [area_feature(session, a) for a in created]}


@router.get("/areas/{area_id}")
def get_area(area_id: int, who: Principal = Depends(principal), session: Session = DB) -> dict[str, Any]:
    return area_feature(session, owned_area(session, who, area_id))


@router.patch("/areas/{area_id}")
def update_area(area_id: int, body: dict[str, Any] = Body(..., examples=[{"properties": {"max_cloud_cover": 40}}]),
                fix: bool = False, who: Principal = Depends(principal),
                session: Session = DB, settings: Settings = Depends(settings_of)) -> dict[str, Any]:
    """Change an area: a Feature (or an object of properties) with any of name, geometry, thresholds,
    recipients, questions, alert_frequency, pairing_policy. Unset fields keep their value."""
    area = owned_area(session, who, area_id)
    props = body.get("properties") if body.get("type") == "Feature" else body
    props = dict(props or {})
    geometry = body.get("geometry") if body.get("type") == "Feature" else props.pop("geometry", None)
    try:
        # An unknown (misspelled) key is refused, as on import.
        svc.split_properties(props, "request", hints=PATCH_HINTS)
        parsed = (parse_areas(json.dumps(geometry), fix=fix, max_vertices=settings.max_area_vertices,
                              fix_hint=PATCH_HINTS["fix"])[0]
                  if geometry is not None else None)
        svc.update_area(session, area, svc.AreaOptions.from_properties(props), max_area_km2=settings.max_area_km2,
                        geometry=parsed, rename=props.get("name"), hints=PATCH_HINTS)
    except (svc.AreaError, AreaGeometryError, TypeError) as exc:
        raise _refused(exc) from None
    return area_feature(session, area)


@router.delete("/areas/{area_id}", status_code=204)
def delete_area(area_id: int, who: Principal = Depends(principal), session: Session = DB) -> Response:
    """Remove the area with its observations, analyses and findings."""
    svc.remove_area(session, owned_area(session, who, area_id))
    return Response(status_code=204)


@router.post("/areas/{area_id}/pause")
def pause(area_id: int, who: Principal = Depends(principal), session: Session = DB) -> dict[str, Any]:
    return area_feature(session, svc.set_status(session, owned_area(session, who, area_id), AreaStatus.PAUSED))


@router.post("/areas/{area_id}/resume")
def resume(area_id: int, who: Principal = Depends(principal), session: Session = DB) -> dict[str, Any]:
    return area_feature(session, svc.set_status(session, owned_area(session, who, area_id), AreaStatus.ACTIVE))


def _set_options(session: Session, who: Principal, area_id: int, opts: svc.AreaOptions,
                 settings: Settings) -> dict[str, Any]:
    """Apply ``opts`` to the caller's area with the CLI's validation; 422 with its message when refused."""
    area = owned_area(session, who, area_id)
    try:
        svc.update_area(session, area, opts, max_area_km2=settings.max_area_km2)
    except svc.AreaError as exc:
        raise _refused(exc) from None
    return area_feature(session, area)


@router.put("/areas/{area_id}/recipients")
def set_recipients(area_id: int, recipients: list[str] = Body(..., embed=True), who: Principal = Depends(principal),
                   session: Session = DB, settings: Settings = Depends(settings_of)) -> dict[str, Any]:
    """Replace the e-mail recipients (validated like ``--recipient``)."""
    return _set_options(session, who, area_id, svc.AreaOptions(recipients=recipients), settings)


@router.put("/areas/{area_id}/questions")
def set_questions(area_id: int, questions: list[str] = Body(..., embed=True), who: Principal = Depends(principal),
                  session: Session = DB, settings: Settings = Depends(settings_of)) -> dict[str, Any]:
    """Replace the question set (template ids of ``GET /api/questions``; empty = every template)."""
    return _set_options(session, who, area_id, svc.AreaOptions(questions=questions), settings)


@router.get("/questions")
def questions(who: Principal = Depends(principal)) -> list[dict[str, Any]]:
    """The question templates an area can ask about each change."""
    return [{"id": t.id, "text": t.text, "unit": t.unit} for t in load_templates()]


@router.get("/areas/{area_id}/observations")
def observations(area_id: int, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0),
                 who: Principal = Depends(principal), session: Session = DB) -> list[dict[str, Any]]:
    """Every acquisition seen over the area, newest first: clear / cloudy / partial / pending / failed, the
    covered fraction (imaged / area pixels), the clear fraction (clear / imaged pixels) and the reason, and
    the analyses it is the after scene of (with the pairing reason)."""
    area = owned_area(session, who, area_id)
    rows = session.execute(
        select(Observation, Scene).join(Scene, Scene.id == Observation.scene_id)
        .where(Observation.area_id == area.id).order_by(Scene.acquired_at.desc()).limit(limit).offset(offset)
    ).all()
    scene_ids = [scene.id for _, scene in rows]
    analyses: dict[int, list[dict[str, Any]]] = {}
    for an in session.scalars(select(Analysis).where(Analysis.area_id == area.id,
                                                     Analysis.after_scene_id.in_(scene_ids))):
        analyses.setdefault(an.after_scene_id, []).append(
            {"id": an.id, "status": an.status.value, "before_scene_id": an.before_scene_id,
             "pair_reason": an.pair_reason})
    return [{
        "scene_id": scene.id, "item_id": scene.item_id, "acquired_at": scene.acquired_at.isoformat(),
        "platform": scene.platform, "tile": scene.tile, "scene_cloud_cover": scene.cloud_cover,
        "status": obs.status.value, "covered_fraction": obs.covered_fraction,
        "clear_fraction": obs.clear_fraction, "reason": obs.reason,
        "analyses": analyses.get(scene.id, []),
    } for obs, scene in rows]
