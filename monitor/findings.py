"""Querying stored findings: filters → rows, and rows → table, GeoJSON or CSV.

Used by ``unirs-monitor findings`` and by ``benchmarks/bench_queries.py`` (so the benchmark measures
exactly what users run). Every value reaches SQL as a bound parameter. The indexes these queries rely on
are declared on :class:`core.models.Finding` (area + time, time, GiST geometry, area + trigram text,
time + trigram text).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import IO, Any

from shapely.geometry import shape
from sqlalchemy import Text, cast, func, literal_column, or_, select, union, union_all
from sqlalchemy.orm import Session

from core.models import Analysis, Area, Finding, FindingImage, Scene
from monitor.choices import FINDING_KINDS
from monitor.tables import Column, render_table

KINDS = FINDING_KINDS


class QueryError(ValueError):
    """A filter that cannot be applied; the message says why."""


@dataclass(frozen=True)
class FindingFilter:
    area: str | None = None
    since: datetime | None = None  # inclusive, observed_at (the after scene's acquisition time)
    until: datetime | None = None  # exclusive
    kind: str | None = None
    bbox: tuple[float, float, float, float] | None = None  # lon/lat: minx, miny, maxx, maxy
    min_hectares: float | None = None
    text: str | None = None  # case-insensitive substring of the caption or the answer
    limit: int | None = 100


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise QueryError(f"--bbox {text!r}: expected four numbers minx,miny,maxx,maxy (lon/lat)") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise QueryError(f"--bbox {text!r}: expected four numbers minx,miny,maxx,maxy (lon/lat)")
    minx, miny, maxx, maxy = values
    if not (-180 <= minx < maxx <= 180 and -90 <= miny < maxy <= 90):
        raise QueryError(f"--bbox {text!r}: need -180 ≤ minx < maxx ≤ 180 and -90 ≤ miny < maxy ≤ 90 (lon/lat order)")
    return minx, miny, maxx, maxy


def like_pattern(text: str) -> str:
    """A substring pattern for ILIKE where the user's % and _ mean themselves."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _time_bounds(stmt, flt: FindingFilter, *, area: bool = False):
    """Time bounds (and, with ``area``, the area by name) on a statement over ``findings``: the text-search
    CTEs carry the area so they walk that area's rows (ix_findings_area_observed), not everyone's."""
    if flt.since is not None:
        stmt = stmt.where(Finding.observed_at >= flt.since)
    if flt.until is not None:
        stmt = stmt.where(Finding.observed_at < flt.until)
    if area and flt.area is not None:
        stmt = stmt.where(Finding.area_id == select(Area.id).where(Area.name == flt.area).scalar_subquery())
    return stmt


# The caption and the answer as one string, the expression of the (observed_at, trigram) GiST index
# ix_findings_observed_text_trgm (revision 0015; the SQL text must stay the index's). A substring of either
# is a substring of this, so ILIKE on it finds every candidate; the exact test (caption or answer) follows.
SEARCH_TEXT = literal_column("(coalesce(findings.caption, '') || ' ' || coalesce(findings.answer, ''))")
# KNN order of that index: distance from a moment after every observation = observed_at newest first.
NEWEST_FIRST = literal_column("(findings.observed_at <-> '9999-12-31 00:00:00+00'::timestamptz)")


def _row_filters(stmt, flt: FindingFilter):
    """Kind, box and size conditions on a statement over ``findings``."""
    if flt.kind is not None:
        if flt.kind not in KINDS:
            raise QueryError(f"kind must be one of {', '.join(KINDS)}, got {flt.kind!r}")
        stmt = stmt.where(Finding.kind == flt.kind)
    if flt.bbox is not None:
        stmt = stmt.where(func.ST_Intersects(Finding.geom, func.ST_MakeEnvelope(*flt.bbox, 4326)))
    if flt.min_hectares is not None:
        stmt = stmt.where(Finding.hectares >= flt.min_hectares)
    return stmt


def build_statement(flt: FindingFilter, *, area_first: tuple[int, int] | None = None,
                    nearest: int | None = None, statistics_text: bool = False):
    """The SELECT for ``flt``, newest first. ``statistics_text``: ``statistics`` as PostgreSQL's JSON text
    (str), not parsed.

    A text filter is applied one of three ways (see :func:`_text_search` for when each is used):
    ``area_first=(N, CAP)`` (an area's first step, one statement) runs ILIKE on the area's N newest
    findings and, only when fewer than ``flt.limit`` of them match, takes the area's matches from the
    (area, trigram) GIN indexes instead, at most CAP + 1 of them; it adds the columns ``scanned`` (matches
    among the N newest) and ``matches`` (GIN matches kept: CAP + 1 means "maybe more"; 0 when not run).
    ``nearest=N`` walks the (observed_at, trigram) GiST index newest first and keeps the first N matches
    (plus every match at the N-th's observed_at, so ties are ordered by id as everywhere); otherwise the
    matches come from the trigram GIN indexes in a MATERIALIZED CTE and are ordered afterwards.
    """
    stmt = (
        select(
            Finding.id, Finding.analysis_id, Area.name.label("area"), Finding.kind, Finding.change_class,
            Finding.hectares, Finding.alert_state, Finding.screen_verdict,
            Finding.caption, Finding.question, Finding.answer, Finding.confidence,
            cast(Finding.statistics, Text).label("statistics") if statistics_text else Finding.statistics,
            Finding.analyser_name, Finding.analyser_version, Finding.observed_at,
            Finding.before_observed_at,
            # RFC 7946: lon/lat, exterior rings counter-clockwise; 7 decimals ≈ 1 cm.
            func.ST_AsGeoJSON(func.ST_ForcePolygonCCW(Finding.geom), 7).label("geometry"),
        )
        .join(Area, Area.id == Finding.area_id)
    )
    # The area as a constant (an InitPlan), not a join condition: with ``areas.name = …`` the planner cannot
    # see that one area's rows are wanted, and a streamed export (server-side cursor, planned for the first
    # rows) walked every finding newest first — 4.7 s instead of 0.4 s for 25,000 of 5 M findings.
    stmt = _row_filters(_time_bounds(stmt, flt, area=True), flt)
    if flt.text:
        pattern = like_pattern(flt.text)

        def matches_text(table):
            return or_(table.c.caption.ilike(pattern, escape="\\"), table.c.answer.ilike(pattern, escape="\\"))

        # Both forms are MATERIALIZED CTEs on purpose: the planner prices ILIKE like an integer comparison,
        # so, left to itself, it either walks observed_at backwards running ILIKE on every row (20,000
        # evaluations for a word in 0.5 % of the rows) or fetches every trigram match of a common word.
        if nearest is not None:
            # Only the findings table in FROM (no alias): SEARCH_TEXT and NEWEST_FIRST name it.
            findings = Finding.__table__
            knn = _row_filters(_time_bounds(select(findings.c.id, findings.c.observed_at), flt, area=True), flt)
            # The exact test (caption or answer) is left out of the walk on purpose: estimated on both columns
            # it makes the planner expect a handful of rows and sort a bitmap of all of them instead of
            # walking; applied to the result below, a candidate it rejects only leaves the page short
            # (then _text_search goes on to the next step).
            knn = knn.where(SEARCH_TEXT.ilike(pattern, escape="\\"))
            knn = knn.order_by(NEWEST_FIRST).limit(nearest).cte("nearest").prefix_with("MATERIALIZED")
            # Every candidate at the last one's observed_at: all at that moment are ordered by id.
            ties = _row_filters(_time_bounds(select(findings.c.id), flt, area=True), flt).where(
                findings.c.observed_at == select(func.min(knn.c.observed_at)).scalar_subquery(),
                SEARCH_TEXT.ilike(pattern, escape="\\"))
            matched = union(select(knn.c.id), ties).cte("text_matches")
            stmt = stmt.join(matched, matched.c.id == Finding.id).where(
                or_(Finding.caption.ilike(pattern, escape="\\"), Finding.answer.ilike(pattern, escape="\\")))
        elif area_first is not None:
            scan_rows, cap = area_first
            # The row filters go into both CTEs: "N newest" and "every match" are then of the rows the
            # query can return, so a full scan step or a GIN step under the cap is the whole answer.
            newest = _row_filters(_time_bounds(select(Finding.id, Finding.caption, Finding.answer), flt,
                                               area=True), flt)
            newest = newest.order_by(Finding.observed_at.desc(), Finding.id.desc()).limit(scan_rows)
            newest = newest.cte("newest").prefix_with("MATERIALIZED")
            scanned = select(newest.c.id).where(matches_text(newest)).cte("scanned").prefix_with("MATERIALIZED")
            n_scanned = select(func.count()).select_from(scanned).scalar_subquery()
            findings = Finding.__table__
            # ``n_scanned < limit`` has no column in it: a one-time filter, so the GIN lookup is not run at
            # all when the scan found enough.
            indexed = _row_filters(_time_bounds(select(findings.c.id).where(matches_text(findings)), flt,
                                                area=True), flt).where(n_scanned < flt.limit)
            indexed = indexed.limit(cap + 1).cte("indexed").prefix_with("MATERIALIZED")
            n_indexed = select(func.count()).select_from(indexed).scalar_subquery()
            matched = union_all(select(scanned.c.id).where(n_scanned >= flt.limit), select(indexed.c.id))
            matched = matched.cte("text_matches")
            stmt = stmt.join(matched, matched.c.id == Finding.id).add_columns(
                n_scanned.label("scanned"), n_indexed.label("matches"))
        else:
            findings = Finding.__table__
            text_matches = _time_bounds(select(findings.c.id).where(matches_text(findings)), flt, area=True)
            text_matches = text_matches.cte("text_matches").prefix_with("MATERIALIZED")
            stmt = stmt.join(text_matches, text_matches.c.id == Finding.id)
    stmt = stmt.order_by(Finding.observed_at.desc(), Finding.id.desc())
    if flt.limit is not None:
        if flt.limit < 1:
            raise QueryError(f"limit must be at least 1, got {flt.limit}")
        stmt = stmt.limit(flt.limit)
    return stmt


def query_findings(session: Session, flt: FindingFilter) -> list[dict[str, Any]]:
    """Findings matching every given filter, newest observation first."""
    if flt.text and flt.limit is not None:
        rows = _text_search(session, flt)
    else:
        rows = session.execute(build_statement(flt)).mappings().all()
    return [_decoded(row) for row in rows]


def _decoded(row: Any) -> dict[str, Any]:
    return {**row, "geometry": json.loads(row["geometry"]) if row["geometry"] else None}


# Rows fetched per round trip of a streamed export (a server-side cursor: psycopg named cursor).
STREAM_BATCH = 2000


def iter_findings(session: Session, flt: FindingFilter, *, batch: int | None = None,
                  geometry_text: bool = False) -> Iterator[dict[str, Any]]:
    """Every finding matching ``flt`` (``limit`` None = all), newest first, streamed from a server-side
    cursor ``batch`` rows at a time: an export of a whole area never holds its result in memory.
    ``geometry_text``: ``geometry`` and ``statistics`` stay the JSON text PostgreSQL wrote (for
    :func:`write_geojson`, which copies them through instead of parsing and re-encoding every value)."""
    if flt.text and flt.limit is not None:
        yield from query_findings(session, flt)  # bounded by the limit; the step-wise plan of _text_search
        return
    # Core execution, not the ORM's, and plain tuples zipped with the keys: the ORM's per-row loading cost
    # two thirds of an area export's time, a RowMapping per row another tenth.
    connection = session.connection().execution_options(stream_results=True, yield_per=batch or STREAM_BATCH)
    result = connection.execute(build_statement(flt, statistics_text=geometry_text))
    keys = tuple(result.keys())
    for row in result:
        record = dict(zip(keys, row, strict=True))
        if not geometry_text and record["geometry"]:
            record["geometry"] = json.loads(record["geometry"])
        yield record


# Text search, newest first, bounded whatever the word's frequency:
# 1. without an area: the (observed_at, trigram) GiST index walked newest first over the newest
#    TEXT_WINDOWS_DAYS[0] days (revision 0015) — a word with `limit` matches in that window costs a few
#    hundred index entries per match found, and the window bounds the walk for a rare one;
#    within an area, in one statement: ILIKE on the area's newest SCAN_ROWS_PER_RESULT × limit findings
#    (a common word has `limit` matches among them; the GiST walk would read every area's rows), and only
#    when that finds fewer, every match at once from the (area, trigram) GIN indexes (revision 0009), which
#    answers when the area has at most AREA_MATCHES_PER_RESULT × limit of them;
# 2. otherwise the trigram GIN indexes find the matches in widening windows back from the newest finding,
#    so a moderately common word never means fetching all of its matches to keep the newest hundred.
# Whenever a step returns `limit` rows, every row newer than its boundary was considered: they are the
# newest matches overall.
SCAN_ROWS_PER_RESULT = 30
TEXT_WINDOWS_DAYS = (30, 180, 1080)
AREA_MATCHES_PER_RESULT = 10


def _text_search(session: Session, flt: FindingFilter) -> Sequence[Any]:
    limit = flt.limit or 0
    windows = TEXT_WINDOWS_DAYS
    if flt.area is None:
        newest = session.scalar(_time_bounds(select(func.max(Finding.observed_at)), replace(flt, since=None)))
        if newest is None:
            return []
        lower = newest - timedelta(days=windows[0])
        near = replace(flt, since=lower if flt.since is None or flt.since < lower else flt.since)
        rows = session.execute(build_statement(near, nearest=limit)).mappings().all()
        if len(rows) >= limit:
            return rows
        if near.since == flt.since:  # the window was the whole query, but the walk may have rejected candidates
            return session.execute(build_statement(flt)).mappings().all()
        windows = windows[1:]  # the GIN windows start wider: this one held fewer than `limit`
    else:
        cap = AREA_MATCHES_PER_RESULT * limit
        rows = session.execute(build_statement(flt, area_first=(SCAN_ROWS_PER_RESULT * limit, cap))).mappings().all()
        # The scan found `limit` matches among the newest rows, or the GIN step held every match (under its
        # cap; none at all when no row came back): these are the newest matches.
        if not rows or rows[0]["scanned"] >= limit or rows[0]["matches"] <= cap:
            return [{k: v for k, v in row.items() if k not in ("scanned", "matches")} for row in rows]
        newest = session.scalar(_time_bounds(select(func.max(Finding.observed_at)), replace(flt, since=None)))
        if newest is None:
            return []
    for days in windows:
        lower = newest - timedelta(days=days)
        if flt.since is not None and lower <= flt.since:
            break
        rows = session.execute(build_statement(replace(flt, since=lower))).mappings().all()
        if len(rows) >= limit:
            return rows
    return session.execute(build_statement(flt)).mappings().all()


def get_finding(session: Session, finding_id: int) -> dict[str, Any] | None:
    """One finding in full: every column, its analysis and scenes, and its thumbnails (sizes, not bytes)."""
    rows = query_findings_by_id(session, finding_id)
    if not rows:
        return None
    record = rows[0]
    analysis = session.get(Analysis, record["analysis_id"])
    scenes = {s.id: s for s in session.scalars(
        select(Scene).where(Scene.id.in_([analysis.after_scene_id, analysis.before_scene_id or -1]))
    )}
    record["analysis"] = {
        "id": analysis.id,
        "status": analysis.status.value,
        "analyser": analysis.analyser,
        "pair_reason": analysis.pair_reason,
        "after_scene": scenes[analysis.after_scene_id].item_id,
        "before_scene": scenes[analysis.before_scene_id].item_id if analysis.before_scene_id in scenes else None,
        "stats": analysis.stats,
    }
    record["images"] = [
        {"role": role, "mime_type": mime, "width": w, "height": h, "bytes": n}
        for role, mime, w, h, n in session.execute(
            select(FindingImage.role, FindingImage.mime_type, FindingImage.width, FindingImage.height,
                   func.octet_length(FindingImage.data))
            .where(FindingImage.finding_id == finding_id)
            .order_by(FindingImage.role)
        ).all()
    ]
    return record


def query_findings_by_id(session: Session, finding_id: int) -> list[dict[str, Any]]:
    stmt = build_statement(FindingFilter(limit=None)).where(Finding.id == finding_id)
    rows = session.execute(stmt).mappings().all()
    return [{**row, "geometry": json.loads(row["geometry"]) if row["geometry"] else None} for row in rows]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def to_feature(row: dict[str, Any]) -> dict[str, Any]:
    props = {k: v for k, v in row.items() if k not in {"geometry", "id"}}
    for key in ("observed_at", "before_observed_at"):
        props[key] = _iso(props.get(key))
    return {"type": "Feature", "id": row["id"], "geometry": row["geometry"], "properties": props}


def to_feature_collection(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 7946: WGS84 lon/lat, no ``crs`` member; findings without a place have a null geometry."""
    return {"type": "FeatureCollection", "features": [to_feature(r) for r in rows]}


def write_geojson(rows: Iterable[dict[str, Any]], out: IO[str], default: Any = None) -> int:
    """The same FeatureCollection as :func:`to_feature_collection`, written one feature at a time
    (rows from :func:`iter_findings`); returns the number of features."""
    out.write('{"type": "FeatureCollection", "features": [')
    n = 0
    encode = json.JSONEncoder(ensure_ascii=False, default=default).encode  # json.dumps builds one per call
    for row in rows:
        feature = to_feature(row)
        geometry, statistics = feature["geometry"], feature["properties"].get("statistics")
        # JSON text from PostgreSQL (iter_findings(geometry_text=True)) goes in where a null was written.
        # Every '"' inside a JSON string is escaped, so the first '"key": null' is that member.
        if isinstance(geometry, str):
            feature["geometry"] = None
        if isinstance(statistics, str):
            feature["properties"]["statistics"] = None
        text = encode(feature)
        if isinstance(geometry, str):
            head, _, tail = text.partition('"geometry": null')
            text = head + '"geometry": ' + geometry + tail
        if isinstance(statistics, str):
            head, _, tail = text.partition('"statistics": null')
            text = head + '"statistics": ' + statistics + tail
        out.write(("\n" if n == 0 else ",\n") + text)
        n += 1
    out.write("\n]}\n" if n else "]}\n")
    return n


CSV_COLUMNS = (
    "id", "analysis_id", "area", "kind", "change_class", "hectares", "alert_state", "screen_verdict", "caption",
    "question", "answer", "confidence",
    "analyser_name", "analyser_version", "observed_at", "before_observed_at", "statistics", "geometry_wkt",
)


def write_csv(rows: Iterable[dict[str, Any]], out: IO[str]) -> None:
    """One line per finding; geometry as WKT (lon lat order), statistics as JSON. ``rows`` may be a stream
    (:func:`iter_findings`): lines are written as rows arrive."""
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record = {k: row.get(k) for k in CSV_COLUMNS}
        record["observed_at"] = _iso(row["observed_at"])
        record["before_observed_at"] = _iso(row["before_observed_at"])
        record["statistics"] = json.dumps(row["statistics"], sort_keys=True)
        record["geometry_wkt"] = shape(row["geometry"]).wkt if row["geometry"] else ""
        writer.writerow(record)


def format_table(rows: list[dict[str, Any]], *, terminal: bool | None = None) -> str:
    """A terminal table (rich): the fields people scan for, long text cut with "…". ``state`` is the
    region's alert state (probable, confirmed, dismissed, redetected, seasonal, atmospheric;
    workers/confirmation.py), ``screen`` the time-series screen's verdict (workers/screen.py); both are
    empty for other kinds and for rows written before those columns existed. A summary's hectares are the
    change of every class, so its class cell says "all classes" (its stored ``change_class`` is only the
    class that heads it; the exports keep that field as stored)."""
    columns = [Column("id", justify="right"), Column("observed"), Column("area", 24), Column("kind"),
               Column("class", 16), Column("hectares", justify="right"), Column("state", 11), Column("screen", 11),
               Column("text", 60)]
    return render_table(columns, [
        (
            r["id"], r["observed_at"].strftime("%Y-%m-%d"), r["area"], r["kind"],
            "all classes" if r["kind"] == "summary" and r["change_class"] else r["change_class"],
            None if r["hectares"] is None else f"{r['hectares']:.2f}",
            r.get("alert_state"), r.get("screen_verdict"),
            r["caption"] if r["kind"] != "answer" else f"{r['question']} → {r['answer']}",
        )
        for r in rows
    ], terminal=terminal)
