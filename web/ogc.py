"""Findings as OGC API – Features – Part 1: Core (OGC 17-069r4), GeoJSON encoding, scoped to the caller.

Conformance classes: core, geojson, oas30. Collections: ``findings`` (every finding: summaries and answers
have a null geometry) and ``change_regions`` (the changed-region polygons only). Items take ``bbox``
(CRS84 minx,miny,maxx,maxy), ``datetime`` (RFC 3339 instant or interval ``a/b``, ``../b``, ``a/..``, on the
after scene's acquisition time), ``limit`` (1–1000, default 10; larger values are capped as §7.15.6
allows), ``offset`` (our paging token, followed through the ``next`` link), and property filters
``area_id``, ``change_class`` and ``kind``. Unknown parameters answer 400 (/req/core/query-param-unknown).
QGIS and GDAL (``ogrinfo OAPIF:https://host/ogc``) read it with ``Authorization: Bearer …``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.models import Area, Finding
from monitor import findings as fq
from web.deps import DB, Principal, owned, owned_finding, principal

router = APIRouter(prefix="/ogc", tags=["OGC API Features"])

CONFORMANCE = [
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/oas30",
]
CRS84 = "http://www.opengis.net/def/crs/OGC/1.3/CRS84"
COLLECTIONS = {
    "findings": ("Findings", "Every finding of your areas: changed regions, analysis summaries, answers.", None),
    "change_regions": ("Change regions", "Polygons of changed land cover, with class and hectares.", "region"),
}
ITEM_PARAMS = {"bbox", "datetime", "limit", "offset", "area_id", "change_class", "kind", "f"}
GEOJSON = "application/geo+json"


def _json(body: dict[str, Any], media_type: str = "application/json") -> Response:
    return Response(json.dumps(body, default=str), media_type=media_type)


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/ogc"


@router.get("")
def landing(request: Request) -> Response:
    """The landing page (/req/core/root-success). Public, like /conformance: they describe the service."""
    base = _base(request)
    return _json({
        "title": "UniRS Monitor findings", "description": "Satellite change findings as OGC API Features",
        "links": [
            {"href": base, "rel": "self", "type": "application/json", "title": "this document"},
            {"href": str(request.base_url) + "api/openapi.json", "rel": "service-desc",
             "type": "application/vnd.oai.openapi+json;version=3.0", "title": "the API definition"},
            {"href": str(request.base_url) + "api/docs", "rel": "service-doc", "type": "text/html"},
            {"href": f"{base}/conformance", "rel": "conformance", "type": "application/json"},
            {"href": f"{base}/collections", "rel": "data", "type": "application/json"},
        ],
    })


@router.get("/conformance")
def conformance() -> Response:
    return _json({"conformsTo": CONFORMANCE})


def _collection(request: Request, session: Session, who: Principal, cid: str) -> dict[str, Any]:
    title, description, kind = COLLECTIONS[cid]
    stmt = select(func.ST_XMin(func.ST_Extent(Finding.geom)), func.ST_YMin(func.ST_Extent(Finding.geom)),
                  func.ST_XMax(func.ST_Extent(Finding.geom)), func.ST_YMax(func.ST_Extent(Finding.geom)),
                  func.min(Finding.observed_at), func.max(Finding.observed_at)).join(Area, Area.id == Finding.area_id)
    if kind:
        stmt = stmt.where(Finding.kind == kind)
    minx, miny, maxx, maxy, first, last = session.execute(owned(stmt, who)).one()
    items = f"{_base(request)}/collections/{cid}/items"
    return {
        "id": cid, "title": title, "description": description, "itemType": "feature", "crs": [CRS84],
        "extent": {
            "spatial": {"bbox": [[minx, miny, maxx, maxy] if minx is not None else [-180, -90, 180, 90]],
                        "crs": CRS84},
            "temporal": {"interval": [[first.isoformat() if first else None, last.isoformat() if last else None]],
                         "trs": "http://www.opengis.net/def/uom/ISO-8601/0/Gregorian"},
        },
        "links": [
            {"href": f"{_base(request)}/collections/{cid}", "rel": "self", "type": "application/json"},
            {"href": items, "rel": "items", "type": GEOJSON, "title": title},
        ],
    }


def _check(cid: str) -> None:
    if cid not in COLLECTIONS:
        raise HTTPException(404, f"no collection {cid!r} (have: {', '.join(COLLECTIONS)})")


@router.get("/collections")
def collections(request: Request, who: Principal = Depends(principal), session: Session = DB) -> Response:
    return _json({
        "links": [{"href": f"{_base(request)}/collections", "rel": "self", "type": "application/json"}],
        "collections": [_collection(request, session, who, cid) for cid in COLLECTIONS],
    })


@router.get("/collections/{cid}")
def collection(cid: str, request: Request, who: Principal = Depends(principal),
               session: Session = DB) -> Response:
    _check(cid)
    return _json(_collection(request, session, who, cid))


def parse_datetime(text: str) -> tuple[datetime | None, datetime | None]:
    """RFC 3339 instant or interval → (since inclusive, until inclusive); open ends as None."""
    def one(value: str) -> datetime | None:
        if value in ("", ".."):
            return None
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise HTTPException(400, f"datetime {text!r}: expected RFC 3339, e.g. 2020-08-29T09:40:00Z or "
                                     "2020-01-01T00:00:00Z/..") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

    if "/" in text:
        start, _, end = text.partition("/")
        if start in ("", "..") and end in ("", ".."):
            raise HTTPException(400, f"datetime {text!r}: an interval needs at least one end")
        return one(start), one(end)
    instant = one(text)
    return instant, instant


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 6:  # 3D: minx,miny,minz,maxx,maxy,maxz; findings are 2D
        values = [values[0], values[1], values[3], values[4]]
    if len(values) != 4 or not (-180 <= values[0] <= values[2] <= 180 and -90 <= values[1] <= values[3] <= 90):
        raise HTTPException(400, f"bbox {text!r}: expected minx,miny,maxx,maxy in CRS84 lon/lat")
    return values[0], values[1], values[2], values[3]


def _int(params: Any, name: str, default: int, low: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPException(400, f"{name} {raw!r}: expected an integer") from None
    if value < low:
        raise HTTPException(400, f"{name} must be at least {low}, got {value}")
    return value


@router.get("/collections/{cid}/items")
def items(cid: str, request: Request, who: Principal = Depends(principal),
          session: Session = DB) -> Response:
    """Features of the collection, newest observation first; ``next`` link while more remain."""
    _check(cid)
    params = request.query_params
    unknown = sorted(set(params) - ITEM_PARAMS)
    if unknown:
        raise HTTPException(400, f"unknown query parameter(s) {unknown}; known: {sorted(ITEM_PARAMS)}")
    limit = min(_int(params, "limit", 10, 1), 1000)
    offset = _int(params, "offset", 0, 0)
    since, until = parse_datetime(params["datetime"]) if "datetime" in params else (None, None)
    kind = COLLECTIONS[cid][2] or params.get("kind")
    try:
        flt = fq.FindingFilter(kind=kind, since=since, bbox=parse_bbox(params["bbox"]) if "bbox" in params else None,
                               limit=None)
        stmt = owned(fq.build_statement(flt), who)
    except fq.QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    if until is not None:  # inclusive end (the CLI's --until is exclusive)
        stmt = stmt.where(Finding.observed_at <= until)
    if "area_id" in params:
        stmt = stmt.where(Area.id == _int(params, "area_id", 0, 0))
    if "change_class" in params:
        stmt = stmt.where(Finding.change_class == params["change_class"])
    matched = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery()))
    rows = session.execute(stmt.limit(limit).offset(offset)).mappings().all()
    features = [fq.to_feature({**r, "geometry": json.loads(r["geometry"]) if r["geometry"] else None}) for r in rows]
    url = f"{_base(request)}/collections/{cid}/items"
    kept = {k: v for k, v in params.items() if k not in {"offset", "limit"}}
    links = [{"href": f"{url}?{urlencode({**kept, 'limit': limit, 'offset': offset})}", "rel": "self",
              "type": GEOJSON}]
    if offset + len(rows) < matched:
        links.append({"href": f"{url}?{urlencode({**kept, 'limit': limit, 'offset': offset + limit})}",
                      "rel": "next", "type": GEOJSON})
    if offset > 0:
        links.append({"href": f"{url}?{urlencode({**kept, 'limit': limit, 'offset': max(offset - limit, 0)})}",
                      "rel": "prev", "type": GEOJSON})
    return _json({"type": "FeatureCollection", "features": features, "numberMatched": matched,
                  "numberReturned": len(features), "timeStamp": datetime.now(UTC).isoformat(), "links": links},
                 GEOJSON)


@router.get("/collections/{cid}/items/{fid}")
def item(cid: str, fid: int, request: Request, who: Principal = Depends(principal),
         session: Session = DB) -> Response:
    _check(cid)
    row = owned_finding(session, who, fid)
    if COLLECTIONS[cid][2] and row.kind != COLLECTIONS[cid][2]:
        raise HTTPException(404, f"no feature {fid} in {cid}")
    feature = fq.to_feature(fq.query_findings_by_id(session, fid)[0])
    base = f"{_base(request)}/collections/{cid}"
    feature["links"] = [{"href": f"{base}/items/{fid}", "rel": "self", "type": GEOJSON},
                        {"href": base, "rel": "collection", "type": "application/json"}]
    return _json(feature, GEOJSON)
