"""Observations per (area, acquisition), computed per acquisition for every area waiting on it at once.

A poll leaves ``pending`` rows (an active area × an acquisition one of whose granules touches it). For each
acquisition with rows to compute (oldest first), :func:`observe_pending` loads its granules and the
waiting areas, reads every granule's cloud mask once per window of areas (:func:`eo.observe.observe_acquisition`:
the mosaic of the granules, shared reads) and writes all outcomes in one batched statement:

- scene cloud cover above the area's limit on every granule touching it → ``cloudy`` (not read);
- imaged share below ``min_covered_fraction`` → ``partial`` (not imaged is never cloud);
- clear share of the imaged pixels below ``min_clear_fraction`` → ``cloudy``;
- unreadable mask, refused href, no mask asset, catalogue no longer configured → ``failed`` (retried after
  :data:`FAILED_RETRY_AFTER` for :data:`FAILED_GIVE_UP_AFTER`);
- otherwise the fractions are stored and the row stays ``pending``: :mod:`monitor.pairing` settles it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from geoalchemy2.shape import to_shape
from shapely.geometry.base import BaseGeometry
from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import session_scope
from core.models import Acquisition, Area, AreaStatus, Catalogue, Observation, ObservationStatus, Scene
from eo.cog import CogReadError
from eo.observe import GranuleMask, NoCloudMask, observe_acquisition
from eo.security import HrefRefused

logger = logging.getLogger(__name__)

FAILED_RETRY_AFTER = timedelta(hours=1)
FAILED_GIVE_UP_AFTER = timedelta(days=3)


@dataclass(frozen=True)
class Outcome:
    status: ObservationStatus
    covered: float | None
    clear: float | None
    reason: str | None
    scene_id: int | None = None


@dataclass
class ObserveStats:
    computed: int = 0
    by_status: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    granule_reads: int = 0


@dataclass(frozen=True)
class _Waiting:
    area_id: int
    geom: BaseGeometry
    min_clear: float
    min_covered: float
    max_cloud: float
    granules: tuple[int, ...]  # scene ids of the acquisition's granules touching the area


def classify(covered: float, clear: float | None, min_covered: float, min_clear: float) -> tuple[ObservationStatus,
                                                                                                   str | None]:
    """The status and reason of an observation from its fractions and the area's minimums."""
    if clear is None or covered < min_covered:
        return ObservationStatus.PARTIAL, (f"the acquisition imaged {100 * covered:.0f}% of the area (minimum "
                                           f"{100 * min_covered:.0f}%); the rest is outside its granules or no-data")
    if clear < min_clear:
        imaged = "" if covered >= 0.995 else f" ({100 * covered:.0f}% of the area imaged)"
        return ObservationStatus.CLOUDY, (f"AOI clear fraction {100 * clear:.0f}% is below the area's minimum "
                                          f"{100 * min_clear:.0f}%{imaged}")
    return ObservationStatus.CLEAR, None


def _todo(settings: Settings, area_ids: Iterable[int] | None, limit: int | None) -> dict[int, list[int]]:
    now = datetime.now(UTC)
    query = (
        select(Observation.area_id, Observation.acquisition_id)
        .join(Area, Area.id == Observation.area_id)
        .join(Acquisition, Acquisition.id == Observation.acquisition_id)
        .where(
            Area.status == AreaStatus.ACTIVE,
            or_(
                and_(Observation.status == ObservationStatus.PENDING, Observation.computed_at.is_(None)),
                and_(Observation.status == ObservationStatus.FAILED,
                     Observation.computed_at < now - FAILED_RETRY_AFTER,
                     Observation.created_at > now - FAILED_GIVE_UP_AFTER),
            ),
        )
        .order_by(Acquisition.sensed_at, Acquisition.id, Observation.area_id)
    )
    if area_ids is not None:
        query = query.where(Observation.area_id.in_(list(area_ids)))
    if limit is not None:
        query = query.limit(limit)
    groups: dict[int, list[int]] = {}
    with session_scope(settings) as session:
        for row in session.execute(query):
            groups.setdefault(row.acquisition_id, []).append(row.area_id)
    return groups


def observe_pending(settings: Settings, *, area_ids: Iterable[int] | None = None, limit: int | None = None,
                    progress: Any = None) -> ObserveStats:
    """Compute every pending (or due failed) observation, acquisition by acquisition. Idempotent."""
    groups = _todo(settings, area_ids, limit)
    stats = ObserveStats()
    if progress is not None:
        progress.reset(total=sum(len(v) for v in groups.values()))
    for acquisition_id, ids in groups.items():
        try:
            outcomes = observe_group(settings, acquisition_id, ids, stats)
        except Exception:
            # One broken acquisition must not stop the others; its rows stay as they are, retried next run.
            logger.exception("observing acquisition %d for %d areas failed; will retry", acquisition_id, len(ids))
            continue
        with session_scope(settings) as session:
            save(session, acquisition_id, outcomes)
        stats.computed += len(outcomes)
        for outcome in outcomes.values():
            stats.by_status[outcome.status.value] += 1
        if progress is not None:
            progress.update(len(ids))
    return stats


def _load(settings: Settings, acquisition_id: int, area_ids: list[int]) -> tuple[dict[int, Any], list[_Waiting]]:
    with session_scope(settings) as session:
        scenes = {
            r.id: r for r in session.execute(
                select(Scene.id, Scene.item_id, Scene.assets, Scene.cloud_cover, Scene.footprint,
                       Catalogue.name.label("catalogue"))
                .join(Catalogue, Catalogue.id == Scene.catalogue_id)
                .where(Scene.acquisition_id == acquisition_id).order_by(Scene.id))
        }
        touching = func.array_agg(Scene.id).filter(Scene.id.is_not(None))
        rows = session.execute(
            select(Area.id, Area.geom, Area.min_clear_fraction, Area.min_covered_fraction, Area.max_cloud_cover,
                   touching.label("granules"))
            .outerjoin(Scene, and_(Scene.acquisition_id == acquisition_id,
                                   func.ST_Intersects(Scene.footprint, Area.geom)))
            .where(Area.id.in_(area_ids))
            .group_by(Area.id)
        ).all()
    waiting = [_Waiting(r.id, to_shape(r.geom), float(r.min_clear_fraction), float(r.min_covered_fraction),
                        float(r.max_cloud_cover), tuple(sorted(r.granules or ()))) for r in rows]
    return scenes, waiting


def observe_group(settings: Settings, acquisition_id: int, area_ids: list[int],
                  stats: ObserveStats | None = None) -> dict[int, Outcome]:
    """Outcomes (area id → :class:`Outcome`) of one acquisition over the given areas (shared mask reads)."""
    scenes, waiting = _load(settings, acquisition_id, area_ids)
    outcomes: dict[int, Outcome] = {}
    usable: dict[int, GranuleMask] = {}
    unusable: dict[int, str] = {}
    for scene_id, s in scenes.items():
        try:
            usable[scene_id] = GranuleMask(s.item_id, dict(s.assets or {}), settings.catalogue(s.catalogue),
                                           to_shape(s.footprint))
        except KeyError:
            unusable[scene_id] = f"catalogue {s.catalogue!r} is no longer configured; its assets are not opened"
    to_read: dict[int, _Waiting] = {}
    for w in waiting:
        cover = [scenes[g].cloud_cover for g in w.granules]
        if not w.granules:
            outcomes[w.area_id] = Outcome(ObservationStatus.PARTIAL, 0.0, None,
                                          "no granule of the acquisition touches the area")
        elif all(c is not None and c > w.max_cloud for c in cover):
            outcomes[w.area_id] = Outcome(ObservationStatus.CLOUDY, None, None,
                                          f"scene cloud cover {min(cover):.0f}% is above the area's limit "
                                          f"{w.max_cloud:.0f}% (not read)")
        elif any(g in unusable for g in w.granules):
            outcomes[w.area_id] = Outcome(ObservationStatus.FAILED, None, None,
                                          next(unusable[g] for g in w.granules if g in unusable))
        else:
            to_read[w.area_id] = w
    if to_read:
        needed = sorted({g for w in to_read.values() for g in w.granules})
        granules = [usable[g] for g in needed]
        reads: list[Any] = []
        try:
            coverage = observe_acquisition(granules, {a: w.geom for a, w in to_read.items()}, stats=reads)
        except (HrefRefused, CogReadError, NoCloudMask) as exc:
            reason = {HrefRefused: "cloud mask href refused: ", CogReadError: "cloud mask unreadable: "}.get(
                type(exc), "")
            for area_id in to_read:
                outcomes[area_id] = Outcome(ObservationStatus.FAILED, None, None, f"{reason}{exc}")
            return outcomes
        if stats is not None:
            stats.granule_reads += sum(r.reads for r in reads)
        by_item = {usable[g].item_id: g for g in needed}
        for area_id, w in to_read.items():
            cov = coverage[area_id]
            status, reason = classify(cov.covered_fraction, cov.clear_fraction, w.min_covered, w.min_clear)
            first = by_item[cov.granules_used[0]] if cov.granules_used else None
            outcomes[area_id] = Outcome(status, cov.covered_fraction, cov.clear_fraction, reason, first)
    return outcomes


def save(session: Session, acquisition_id: int, outcomes: dict[int, Outcome]) -> None:
    """Write the outcomes of one acquisition in one batched UPDATE; clear ones stay ``pending`` for pairing."""
    if not outcomes:
        return
    rows = [{"a": area_id, "q": acquisition_id,
             "st": ObservationStatus.PENDING if o.status is ObservationStatus.CLEAR else o.status,
             "cov": o.covered, "clr": o.clear, "why": o.reason, "sid": o.scene_id}
            for area_id, o in outcomes.items()]
    stmt = (
        update(Observation.__table__)
        .where(Observation.__table__.c.area_id == bindparam("a"),
               Observation.__table__.c.acquisition_id == bindparam("q"))
        .values(status=bindparam("st"), covered_fraction=bindparam("cov"), clear_fraction=bindparam("clr"),
                reason=bindparam("why"), scene_id=func.coalesce(bindparam("sid"), Observation.__table__.c.scene_id),
                computed_at=func.now())
    )
    session.connection().execute(stmt, rows)
