"""What a report says about one analysis, read from the database into plain objects.

Templates receive these objects and nothing else (no sessions, no lazy loading inside Jinja2), so a
template bug cannot issue queries and the same object feeds the HTML, the text part, the subject and the
GeoJSON attachment.

"Changed hectares" of an analysis, everywhere in reports: the sum over its ``region`` findings, or, when
it has none, the hectares of its ``summary`` finding (a spectral-only analyser may report just a total).
"Alerting hectares": the same over the regions whose class is one of the area's ``alert_classes``
(:func:`alerting_hectares`, the regions :func:`monitor.reports.immediate.region_alerts_sql` counts). The
subject and the headline figure say only what alerts ("Forest loss 0.25 ha"); everything else is in the
body's class table, marked as reported, not alerted.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from shapely.geometry import shape
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from core.models import Analysis, Area, Finding, Observation, Scene
from eo.change_classes import format_hectares, headline, label
from monitor.reports.immediate import alerting_region_ids

IMAGE_ROLES = ("before", "after", "overlay")
IMAGE_LABELS = {"before": "Before", "after": "After", "overlay": "Change overlay"}
# Keys of analysis.stats that are shown in their own place, not in the generic statistics table.
_CLEAR_KEYS = {
    "after": ("after_clear_fraction", "clear_fraction_after", "clear_fraction"),
    "before": ("before_clear_fraction", "clear_fraction_before"),
}
_MAX_STATS_ROWS = 20


@dataclass
class SceneInfo:
    item_id: str
    collection: str
    platform: str | None
    tile: str | None
    acquired_at: datetime
    cloud_cover: float | None  # scene-level, percent (from the catalogue)
    clear_fraction: float | None  # over the area itself, 0–1 (from SCL / QA_PIXEL)

    @property
    def is_sentinel2(self) -> bool:
        # The platform says which satellite took it; the collection only when the platform is missing.
        text = (self.platform or self.collection).lower().replace("_", "-")
        return "sentinel-2" in text or "sentinel2" in text


@dataclass
class InlineImage:
    role: str
    label: str
    cid: str  # without angle brackets, as referenced by `cid:` in the HTML
    data: bytes
    mime_type: str
    width: int
    height: int


@dataclass
class AnswerRow:
    question: str
    answer: str
    confidence: float | None
    statistics: list[tuple[str, str]]
    agreement: str | None  # "agrees" | "disagrees" | "computed" | None (not compared)


@dataclass
class ClassTotal:
    change_class: str
    regions: int
    hectares: float
    alerts: bool = False  # some of its hectares alert (the alert rule's regions, monitor.reports.immediate)
    watched: bool = False  # one of the area's alert classes, alerting or not (screened out, seen before, …)

    @property
    def label(self) -> str:
        return label(self.change_class)


@dataclass
class EventRow:
    change_class: str
    caption: str | None
    confidence: float | None


@dataclass
class AnalysisReport:
    analysis_id: int
    area_id: int
    area_name: str
    after: SceneInfo
    before: SceneInfo | None
    pair_reason: str | None
    analyser_name: str
    analyser_version: str
    finished_at: datetime | None
    caption: str | None
    confidence: float | None
    total_hectares: float
    alert_hectares: float
    headline: str  # "Forest loss 0.25 ha" — the alerting classes only; "" when nothing alerts
    alert_on: str  # probable | confirmed (the area's rule)
    alert_states: dict[str, float]  # hectares of the alerting classes by state: probable, confirmed, redetected…
    classes: list[ClassTotal]
    region_count: int
    answers: list[AnswerRow]
    events: list[EventRow]
    stats: list[tuple[str, str]]
    images: list[InlineImage]
    map_url: str
    regions_geojson: dict[str, Any] = field(repr=False)

    @property
    def sentinel2(self) -> bool:
        return self.after.is_sentinel2 or bool(self.before and self.before.is_sentinel2)


def confidence_tier(value: float | None) -> str | None:
    """GFW-style tiers: people triage by "high / medium / low", not by a decimal."""
    if value is None:
        return None
    return "high" if value >= 0.8 else "medium" if value >= 0.5 else "low"


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)


# Operational bookkeeping in analysis.stats (which worker, retries, per-chip arrays, grids): useful in
# `findings show`, noise in an email.
_HIDDEN_STATS = {"analyser", "worker", "attempt", "previous_error", "chip_scores", "timings_s", "grid",
                 "harmonisation", "answers_per_chip", "raw_text", "classes"}


def _flatten(stats: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Readable (name, value) rows: nested dicts flattened, scalars formatted, long or nested lists left out."""
    rows: list[tuple[str, str]] = []
    for key in sorted(stats):
        value = stats[key]
        if key in _HIDDEN_STATS or value is None or value == [] or value == {}:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, name + "."))
        elif isinstance(value, list):
            if len(value) <= 5 and all(not isinstance(v, (dict, list)) for v in value):
                rows.append((name, ", ".join(format_value(v) for v in value)))
        elif key.endswith("_ha") and isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((name, format_hectares(value)))  # the one rounding rule, in the details too
        else:
            rows.append((name, format_value(value)))
    return rows[:_MAX_STATS_ROWS]


def _measure(value: Any, unit: str) -> str:
    if unit == "ha" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_hectares(value)
    return f"{format_value(value)} {unit}".strip()


# Keys of an answer's statistics shown in their own words by _answer_statistics (or redundant there).
_ANSWER_SHOWN = {"agrees", "backing_statistic", "value", "unit", "threshold", "statistic_says_yes", "template_id",
                 "model_answer", "chip_index", "comparison", "model_says_yes", "model_value", "spectral_answer"}


def _answer_statistics(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """The statistic behind an answer in plain words first ("forest_loss_ha 3.2 ha", "statistic says yes"),
    then whatever else the analyser recorded."""
    unit = stats.get("unit") or ""
    rows: list[tuple[str, str]] = []
    if stats.get("backing_statistic") is not None:
        value = stats.get("value")
        rows.append((str(stats["backing_statistic"]), _measure(value, unit) if value is not None else "not measured"))
    if stats.get("threshold") is not None:
        rows.append(("threshold", _measure(stats["threshold"], unit)))
    if isinstance(stats.get("statistic_says_yes"), bool):
        rows.append(("statistic says", "yes" if stats["statistic_says_yes"] else "no"))
    elif stats.get("spectral_answer") is not None:
        rows.append(("statistic's answer", format_value(stats["spectral_answer"])))
    return rows + _flatten({k: v for k, v in stats.items() if k not in _ANSWER_SHOWN})


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _normalise(text: Any) -> str:
    return " ".join(re.sub(r"[^\w.+-]+", " ", str(text).lower()).split())


def agreement(answer: str | None, statistics: dict[str, Any]) -> str | None:
    """Does the pixel statistic back the model's answer?

    "agrees" / "disagrees"; "computed" when the answer *is* the statistic (spectral analyser, no model);
    None when they could not be compared (the report says "not checked" rather than guessing).

    Workers say so themselves (``statistics["agrees"]``: true/false, or null for a computed answer, with
    ``comparison`` "no statistic"/"unreadable" when no comparison was possible). Without that, the answer
    the statistic implies (``statistic_answer`` or ``expected_answer``) is compared with the model's:
    numbers within 10 % (or 0.5 absolute), yes/no by their first word, anything else as normalised text.
    """
    if "agrees" in statistics:
        if statistics.get("comparison") in {"no statistic", "unreadable"}:
            return None
        explicit = statistics["agrees"]
        if explicit is None:
            return "computed"
        return "agrees" if explicit else "disagrees"
    expected = statistics.get("statistic_answer", statistics.get("expected_answer"))
    if expected is None or answer is None:
        return None
    got, want = _normalise(answer), _normalise(expected)
    got_num, want_num = _NUMBER.search(got), _NUMBER.search(want)
    if isinstance(expected, (int, float)) or (want_num and want_num.group() == want):
        if not got_num:
            return "disagrees"
        a, b = float(got_num.group()), float(want_num.group() if want_num else expected)
        return "agrees" if abs(a - b) <= max(0.5, 0.1 * abs(b)) else "disagrees"
    first_got, first_want = (got.split() or [""])[0], (want.split() or [""])[0]
    if first_want in {"yes", "no"}:
        return "agrees" if first_got == first_want else "disagrees"
    return "agrees" if got == want else "disagrees"


def osm_link(base_url: str, lon: float, lat: float, zoom: int) -> str:
    """An OpenStreetMap-style link: a marker at the point and the map centred on it."""
    query = urlencode({"mlat": f"{lat:.5f}", "mlon": f"{lon:.5f}"})
    return f"{base_url.rstrip('/')}/?{query}#map={zoom}/{lat:.5f}/{lon:.5f}"


def zoom_for(bounds: tuple[float, float, float, float]) -> int:
    """Web-map zoom at which the bounds (lon/lat degrees) fit an ~800 px window, clamped to 5..17."""
    minx, miny, maxx, maxy = bounds
    lat = math.radians((miny + maxy) / 2)
    extent = max(maxx - minx, (maxy - miny) / max(math.cos(lat), 0.01), 1e-6)
    # At zoom z one 256 px tile spans 360 / 2^z degrees; ~3 tiles wide, plus a margin.
    return max(5, min(17, math.floor(math.log2(3 * 360 / (extent * 1.5)))))


def _scene(scene: Scene, clear: float | None) -> SceneInfo:
    return SceneInfo(
        item_id=scene.item_id,
        collection=scene.collection,
        platform=scene.platform,
        tile=scene.tile,
        acquired_at=scene.acquired_at,
        cloud_cover=scene.cloud_cover,
        clear_fraction=clear,
    )


def _clear_fraction(session: Session, area_id: int, scene_id: int, stats: dict[str, Any], which: str) -> float | None:
    value = session.scalar(
        select(Observation.clear_fraction).where(Observation.area_id == area_id, Observation.scene_id == scene_id)
    )
    if value is not None:
        return float(value)
    for key in _CLEAR_KEYS[which]:
        if isinstance(stats.get(key), (int, float)):
            return float(stats[key])
    return None


def _images(analysis_id: int, findings: list[Finding]) -> list[InlineImage]:
    """One set of thumbnails: the summary's, else the first finding's that has any."""
    ordered = sorted(findings, key=lambda f: (f.kind != "summary", f.ordinal))
    for finding in ordered:
        by_role = {img.role: img for img in finding.images}
        if by_role:
            return [
                InlineImage(role, IMAGE_LABELS[role], f"img-{analysis_id}-{role}@unirs-monitor", img.data,
                            img.mime_type, img.width, img.height)
                for role in IMAGE_ROLES if (img := by_role.get(role)) is not None
            ]
    return []


# Alert states of a region that is not (or no longer) a change on the ground: the next clear acquisition
# dismissed it, or the time-series screen called it seasonal or atmospheric (workers/confirmation.py
# NOT_TARGETS). The analysis page lists them but does not draw them as changes.
NOT_A_CHANGE = ("dismissed", "seasonal", "atmospheric")


def _regions(session: Session, analysis_id: int, area_name: str, alerting_ids: set[int]) -> list[dict[str, Any]]:
    """The analysis's region findings as GeoJSON Features; properties include ``alert_state``,
    ``screen_verdict`` (NULL in rows older than those columns) and ``alerts`` (in ``alerting_ids``:
    :func:`monitor.reports.immediate.alerting_region_ids` now)."""
    # Right-hand rule and lon/lat order: what RFC 7946 asks of GeoJSON consumers.
    rows = session.execute(
        select(
            Finding.id, Finding.change_class, Finding.hectares, Finding.caption, Finding.confidence,
            Finding.alert_state, Finding.screen_verdict, Finding.observed_at, Finding.before_observed_at,
            func.ST_AsGeoJSON(func.ST_ForcePolygonCCW(Finding.geom), 7).label("geojson"),
        )
        .where(Finding.analysis_id == analysis_id, Finding.kind == "region", Finding.geom.is_not(None))
        .order_by(Finding.ordinal)
    ).all()
    return [
        {
            "type": "Feature",
            "id": r.id,
            "geometry": json.loads(r.geojson),
            "properties": {
                "finding_id": r.id,
                "analysis_id": analysis_id,
                "area": area_name,
                "change_class": r.change_class,
                "hectares": r.hectares,
                "caption": r.caption,
                "confidence": r.confidence,
                "alert_state": r.alert_state,
                "screen_verdict": r.screen_verdict,
                "alerts": r.id in alerting_ids,
                "observed_at": r.observed_at.isoformat(),
                "before_observed_at": r.before_observed_at.isoformat() if r.before_observed_at else None,
            },
        }
        for r in rows
    ]


def _map_url(session: Session, area_id: int, features: list[dict[str, Any]], base_url: str) -> str:
    if features:
        geoms = [shape(f["geometry"]) for f in features]
        minx = min(g.bounds[0] for g in geoms)
        miny = min(g.bounds[1] for g in geoms)
        maxx = max(g.bounds[2] for g in geoms)
        maxy = max(g.bounds[3] for g in geoms)
    else:  # nothing localised: centre on the watched area
        minx, miny, maxx, maxy = session.execute(
            select(func.ST_XMin(Area.geom), func.ST_YMin(Area.geom), func.ST_XMax(Area.geom), func.ST_YMax(Area.geom))
            .where(Area.id == area_id)
        ).one()
    bounds = (minx, miny, maxx, maxy)
    return osm_link(base_url, (minx + maxx) / 2, (miny + maxy) / 2, zoom_for(bounds))


def alerting_hectares(findings: list[Finding], alert_classes: list[str], alerting_ids: set[int]
                      ) -> dict[str, float]:
    """Hectares per alerting class: regions in ``alerting_ids`` (what the alert rule counts,
    :func:`monitor.reports.immediate.alerting_region_ids`), or (no regions at all) the summary's total
    when the summary's class alerts."""
    totals: dict[str, float] = {}
    regions = [f for f in findings if f.kind == "region"]
    if regions:
        for f in regions:
            if f.id in alerting_ids and f.hectares is not None:
                totals[f.change_class] = totals.get(f.change_class, 0.0) + f.hectares
        return totals
    for f in findings:
        if f.kind == "summary" and f.change_class in alert_classes and f.hectares:
            totals[f.change_class] = max(totals.get(f.change_class, 0.0), f.hectares)
    return totals


def _headline(alerting: dict[str, float], alert_on: str) -> str:
    text = headline(alerting)
    return f"Confirmed {text[0].lower()}{text[1:]}" if text and alert_on == "confirmed" else text


def changed_hectares(findings: list[Finding]) -> float:
    regions = [f.hectares for f in findings if f.kind == "region" and f.hectares is not None]
    if regions:
        return float(sum(regions))
    summary = [f.hectares for f in findings if f.kind == "summary" and f.hectares is not None]
    return float(max(summary)) if summary else 0.0


def load_analysis_report(session: Session, analysis_id: int, base_url: str, with_images: bool = True) -> AnalysisReport:
    """Everything one alert says about ``analysis_id``. Raises LookupError if the analysis is gone."""
    analysis = session.get(Analysis, analysis_id)
    if analysis is None:
        raise LookupError(f"analysis {analysis_id} does not exist (deleted with its area?)")
    area = analysis.area
    loader = selectinload(Finding.images) if with_images else None
    stmt = select(Finding).where(Finding.analysis_id == analysis_id).order_by(Finding.ordinal)
    findings = list(session.scalars(stmt.options(loader) if loader is not None else stmt))
    stats = dict(analysis.stats or {})

    summary = next((f for f in findings if f.kind == "summary"), None)
    captioned = summary if summary is not None and summary.caption else next((f for f in findings if f.caption), None)
    classes: dict[str, list[float]] = defaultdict(list)
    for f in findings:
        if f.kind == "region":
            classes[f.change_class or "unclassified"].append(f.hectares or 0.0)
    name, _, version = analysis.analyser.partition("@")
    first = findings[0] if findings else None
    shown = {k for keys in _CLEAR_KEYS.values() for k in keys}
    alert_classes = list(area.alert_classes or [])
    alerting_ids = alerting_region_ids(session, analysis_id)
    features = _regions(session, analysis_id, area.name, alerting_ids)
    alerting = alerting_hectares(findings, alert_classes, alerting_ids)
    states: dict[str, float] = defaultdict(float)
    for f in findings:
        if f.kind == "region" and f.change_class in alert_classes:
            states[f.alert_state or "probable"] += f.hectares or 0.0
    return AnalysisReport(
        analysis_id=analysis.id,
        area_id=area.id,
        area_name=area.name,
        after=_scene(analysis.after_scene, _clear_fraction(session, area.id, analysis.after_scene_id, stats, "after")),
        before=_scene(
            analysis.before_scene, _clear_fraction(session, area.id, analysis.before_scene_id, stats, "before")
        ) if analysis.before_scene is not None else None,
        pair_reason=analysis.pair_reason,
        analyser_name=first.analyser_name if first else name,
        analyser_version=first.analyser_version if first else (version or "?"),
        finished_at=analysis.finished_at,
        caption=captioned.caption if captioned else None,
        confidence=captioned.confidence if captioned else None,
        total_hectares=changed_hectares(findings),
        alert_hectares=float(sum(alerting.values())),
        headline=_headline(alerting, area.alert_on),
        alert_on=area.alert_on,
        alert_states=dict(states),
        classes=sorted(
            (ClassTotal(c, len(v), float(sum(v)), alerting.get(c, 0.0) > 0, c in alert_classes)
             for c, v in classes.items()),
            key=lambda c: (not c.alerts, not c.watched, -c.hectares),
        ),
        region_count=sum(len(v) for v in classes.values()),
        answers=[
            AnswerRow(
                question=f.question or "",
                answer=f.answer or "",
                confidence=f.confidence,
                statistics=_answer_statistics(f.statistics or {}),
                agreement=agreement(f.answer, f.statistics or {}),
            )
            for f in findings if f.kind == "answer"
        ],
        events=[EventRow(f.change_class or "event", f.caption, f.confidence) for f in findings if f.kind == "event"],
        stats=_flatten({k: v for k, v in stats.items() if k not in shown}),
        images=_images(analysis.id, findings) if with_images else [],
        map_url=_map_url(session, area.id, features, base_url),
        regions_geojson={"type": "FeatureCollection", "features": features},
    )
