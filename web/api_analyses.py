"""REST API of analyses and findings: per-area analyses, one analysis as its alert would show it,
findings (GeoJSON or CSV, the ``unirs-monitor findings`` query scoped to the caller) and the stored PNG
thumbnails (``finding_images``: before, after, overlay)."""

from __future__ import annotations

import dataclasses
import io
import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from fastapi.encoders import jsonable_encoder
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Analysis, Area, Finding, FindingImage
from monitor import findings as fq
from monitor.reports.context import load_analysis_report
from web import placement
from web.deps import DB, Principal, owned, owned_analysis, owned_area, owned_finding, principal

router = APIRouter(prefix="/api", tags=["analyses and findings"])
ROLES = ("before", "after", "overlay")


def analysis_row(an: Analysis) -> dict[str, Any]:
    return {
        "id": an.id, "area_id": an.area_id, "status": an.status.value, "after_scene_id": an.after_scene_id,
        "before_scene_id": an.before_scene_id, "pairing_policy": an.pairing_policy, "pair_reason": an.pair_reason,
        "analyser": an.analyser, "analyser_run": an.analyser_run, "attempts": an.attempts,
        "last_error": an.last_error, "created_at": an.created_at, "finished_at": an.finished_at,
        "changed_ha": (an.stats or {}).get("metrics", {}).get("changed_ha"),
    }


@router.get("/areas/{area_id}/analyses")
def area_analyses(area_id: int, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0),
                  who: Principal = Depends(principal), session: Session = DB) -> list[dict[str, Any]]:
    """The area's analyses, newest first, with status, pair and pairing reason."""
    area = owned_area(session, who, area_id)
    rows = session.scalars(select(Analysis).where(Analysis.area_id == area.id)
                           .order_by(Analysis.created_at.desc(), Analysis.id.desc()).limit(limit).offset(offset))
    return jsonable_encoder([analysis_row(an) for an in rows])


def image_finding(session: Session, analysis_id: int) -> int | None:
    """The finding whose thumbnails stand for the analysis: the summary's, else the first that has any
    (the rule of the alert email)."""
    return session.scalar(
        select(Finding.id).join(FindingImage, FindingImage.finding_id == Finding.id)
        .where(Finding.analysis_id == analysis_id)
        .order_by((Finding.kind != "summary"), Finding.ordinal).limit(1)
    )


@router.get("/analyses/{analysis_id}")
def analysis(analysis_id: int, who: Principal = Depends(principal), session: Session = DB) -> dict[str, Any]:
    """One analysis as its alert shows it: the scene pair and why it was chosen, caption, changed hectares
    by class, answers to the area's questions, changed regions (GeoJSON) and image URLs."""
    an = owned_analysis(session, who, analysis_id)
    report = load_analysis_report(session, an.id, "", with_images=False)
    out = {k: v for k, v in dataclasses.asdict(report).items() if k not in {"images", "map_url"}}
    out["analysis"] = analysis_row(an)
    fid = image_finding(session, an.id)
    images = session.execute(select(FindingImage.role, FindingImage.width, FindingImage.bounds)
                             .where(FindingImage.finding_id == fid)).all() if fid else []
    out["images"] = {i.role: f"/api/findings/{fid}/images/{i.role}.png" for i in images}
    # Images stored with their bounds (revision 0018) can be placed on a map: the warped PNG and its extent.
    out["placed_images"] = {i.role: {"url": f"/api/findings/{fid}/placed/{i.role}.png",
                                     "bounds": placement.latlng_bounds(i.bounds, i.width)}
                            for i in images if i.bounds}
    return jsonable_encoder(out)


@router.get("/findings")
def findings(area_id: int | None = None, kind: str | None = None, since: datetime | None = None,
             until: datetime | None = None, bbox: str | None = None, limit: int = Query(1000, ge=1, le=10000),
             format: str = Query("geojson", pattern="^(geojson|csv)$"), who: Principal = Depends(principal),
             session: Session = DB):
    """Your findings, newest first, as GeoJSON (RFC 7946) or CSV (geometry as WKT)."""
    try:
        flt = fq.FindingFilter(kind=kind, since=since, until=until, bbox=fq.parse_bbox(bbox) if bbox else None,
                               limit=limit)
        stmt = owned(fq.build_statement(flt), who)
    except fq.QueryError as exc:
        raise HTTPException(422, str(exc)) from None
    if area_id is not None:
        stmt = stmt.where(Area.id == owned_area(session, who, area_id).id)
    rows = [{**r, "geometry": json.loads(r["geometry"]) if r["geometry"] else None}
            for r in session.execute(stmt).mappings().all()]
    if format == "csv":
        out = io.StringIO()
        fq.write_csv(rows, out)
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="findings.csv"'})
    return Response(json.dumps(fq.to_feature_collection(rows)), media_type="application/geo+json")


@router.get("/findings/{finding_id}")
def finding(finding_id: int, who: Principal = Depends(principal), session: Session = DB) -> dict[str, Any]:
    """One finding in full, with its analysis and the sizes of its thumbnails."""
    row = owned_finding(session, who, finding_id)
    return jsonable_encoder(fq.get_finding(session, row.id))


@router.get("/findings/{finding_id}/placed/{role}.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def placed_image(finding_id: int, role: str, who: Principal = Depends(principal), session: Session = DB,
                 if_none_match: str | None = Header(None)) -> Response:
    """The thumbnail's map part reprojected to Web Mercator (RGBA PNG), to lie exactly on a web map over the
    ``placed_images`` bounds of its analysis; 404 for an image stored without bounds.

    Warped once per process (web/placement.py keeps the recent ones) and sent with an ETag of the stored
    image, so a browser revalidating gets 304 Not Modified with no body and no warp."""
    row = owned_finding(session, who, finding_id)
    image = session.scalar(select(FindingImage).where(FindingImage.finding_id == row.id, FindingImage.role == role))
    if image is None or not image.bounds:
        raise HTTPException(404, f"finding {finding_id} has no placeable {role!r} image")
    etag = placement.placed_etag(image.data, image.bounds)
    # no-cache: the browser keeps the chip but asks each time (a 304 without a warp when it is unchanged).
    headers = {"Cache-Control": "private, no-cache", "ETag": etag}
    if placement.etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(placement.placed_png_cached(etag, image.data, image.bounds), media_type="image/png",
                    headers=headers)


@router.get("/findings/{finding_id}/images/{role}.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def finding_image(finding_id: int, role: str, who: Principal = Depends(principal),
                  session: Session = DB) -> Response:
    """A stored thumbnail: ``before``, ``after`` (true colour) or ``overlay`` (changed pixels)."""
    row = owned_finding(session, who, finding_id)
    image = session.scalar(select(FindingImage).where(FindingImage.finding_id == row.id, FindingImage.role == role))
    if image is None:
        raise HTTPException(404, f"finding {finding_id} has no {role!r} image")
    return Response(image.data, media_type=image.mime_type, headers={"Cache-Control": "private, max-age=86400"})
