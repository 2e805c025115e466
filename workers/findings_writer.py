"""Findings of an analysis, written in the one transaction that marks the analysis done.

Rows (ordinal = position within the analysis, UNIQUE (analysis_id, ordinal)):

0. ``summary``: geometry = union of the changed regions (or the area when nothing changed), hectares =
   mapped changed area, caption (the model's when UniRS ran, else the spectral one), the whole statistics
   record, and the before / after / overlay PNGs as :class:`FindingImage` rows.
1… ``region``: one per changed region ≥ the minimum mapping unit, EPSG:4326, change class, hectares.
… ``answer``: one per question template: the answer, the question, and in ``statistics`` the backing
   statistic, its value and whether a model answer agrees with it.
… ``event``: the event class of the acquisition sequence (UniRS only).

Confidence, stated so readers know what the number means: for spectral findings it is the share of the
area observed clear in both images (a change measured on 40 % of the area is less certain than on
100 %); for regions it also scales with how far the mean dNDVI is past the threshold
(|mean dNDVI| / 0.4, capped at 1); a model answer that contradicts its statistic gets half.

Re-running an analysis never duplicates findings: the transaction deletes the analysis's findings before
inserting, and only commits if the guarded status UPDATE (:func:`workers.leases.finish`) matched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from geoalchemy2.shape import from_shape
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union
from sqlalchemy import cast, delete, func, or_, update
from sqlalchemy.dialects.postgresql import JSONB

from core.config import Settings
from core.db import session_scope
from core.jobs import AnalyserSpec
from core.models import AnalysisStatus, Finding, FindingImage
from workers import leases
from workers.render import Png

logger = logging.getLogger(__name__)

FULL_CONFIDENCE_DNDVI = 0.4


@dataclass
class FindingRow:
    kind: str
    analyser_name: str
    analyser_version: str
    geom: BaseGeometry | None = None
    change_class: str | None = None
    hectares: float | None = None
    caption: str | None = None
    question: str | None = None
    answer: str | None = None
    confidence: float | None = None
    statistics: dict[str, Any] = field(default_factory=dict)
    images: dict[str, Png] = field(default_factory=dict)  # role -> PNG
    alert_state: str | None = None  # regions: probable | redetected | seasonal (workers/confirmation.py)
    first_finding_id: int | None = None
    screen_verdict: str | None = None  # regions: departure | seasonal | unscreened (workers/screen.py)


@dataclass
class Written:
    findings: int
    images: int


def as_multipolygon(geom: BaseGeometry) -> BaseGeometry:
    """Polygonal parts only (a union can add stray lines/points where regions touch at a corner)."""
    if isinstance(geom, Polygon):
        return MultiPolygon([geom])
    if isinstance(geom, MultiPolygon):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon | MultiPolygon)]
    polys: list[Polygon] = []
    for part in parts:
        polys.extend(part.geoms if isinstance(part, MultiPolygon) else [part])
    return MultiPolygon(polys) if polys else geom


def union_or(geoms: list[BaseGeometry], fallback: BaseGeometry) -> BaseGeometry:
    if not geoms:
        return fallback
    return as_multipolygon(unary_union(geoms))


def region_confidence(mean_dndvi: float | None, valid_fraction: float) -> float:
    strength = 1.0 if mean_dndvi is None else min(1.0, abs(mean_dndvi) / FULL_CONFIDENCE_DNDVI)
    return round(strength * valid_fraction, 3)


def write_done(claim: leases.Claim, settings: Settings, *, area_id: int, observed_at: datetime,
               before_observed_at: datetime | None, rows: list[FindingRow], stats: dict[str, Any],
               analyser_run: AnalyserSpec, settlements: list[Any] | None = None) -> Written:
    """Mark the analysis done and store its findings atomically (or raise :class:`leases.LeaseLost`).

    ``settlements`` (:class:`workers.confirmation.Settlement`): earlier probable regions this acquisition
    confirmed or dismissed, updated in the same transaction and only while still probable."""
    images = 0
    with session_scope(settings) as session:
        leases.finish(session, claim, AnalysisStatus.DONE, stats=stats, analyser_run=analyser_run)
        session.execute(delete(Finding).where(Finding.analysis_id == claim.analysis_id))
        for ordinal, row in enumerate(rows):
            finding = Finding(
                analysis_id=claim.analysis_id, area_id=area_id, ordinal=ordinal, kind=row.kind,
                change_class=row.change_class,
                geom=from_shape(row.geom, srid=4326) if row.geom is not None else None,
                hectares=row.hectares, caption=row.caption, question=row.question, answer=row.answer,
                confidence=row.confidence, statistics=leases.json_safe(row.statistics),
                analyser_name=row.analyser_name, analyser_version=row.analyser_version,
                observed_at=observed_at, before_observed_at=before_observed_at,
                alert_state=row.alert_state, first_finding_id=row.first_finding_id,
                screen_verdict=row.screen_verdict,
            )
            for role, png in row.images.items():
                finding.images.append(FindingImage(role=role, mime_type="image/png", width=png.width,
                                                   height=png.height, data=png.data, bounds=png.bounds))
                images += 1
            session.add(finding)
        for settled in settlements or []:
            session.execute(
                update(Finding)
                .where(Finding.id == settled.finding_id, or_(Finding.alert_state.is_(None),
                                                             Finding.alert_state == "probable"))
                .values(alert_state=settled.state, state_changed_at=func.now(),
                        statistics=Finding.statistics.op("||")(
                            cast({"settlement": leases.json_safe(settled.statistics)}, JSONB)))
            )
        session.flush()
    logger.info("analysis %s done: %d findings, %d images", claim.analysis_id, len(rows), images)
    return Written(len(rows), images)
