"""One acquisition's due observations, from the rows waiting on it to their stored outcomes.

The body of the ``unirs.observe`` task (a ``cpu`` worker, workers/observe_tasks.py) and of the scheduler's
in-process fallback (:func:`monitor.observations.observe_pending`): load the acquisition's granules and the
areas whose rows are due (:func:`core.observations.due_areas`), read every granule's cloud mask once for all
of them (:func:`eo.observe.observe_acquisition`), classify, and write every outcome in one batched statement
(:func:`core.observations.save`, which skips rows no longer due: running twice writes once).

- scene cloud cover above the area's limit on every granule touching it → ``cloudy`` (not read);
- imaged share below ``min_covered_fraction`` → ``partial`` (not imaged is never cloud);
- clear share of the imaged pixels below ``min_clear_fraction`` → ``cloudy``;
- unreadable mask, refused href, no mask asset, catalogue no longer configured → ``failed`` (retried after
  :data:`core.observations.FAILED_RETRY_AFTER` for :data:`core.observations.FAILED_GIVE_UP_AFTER`);
- otherwise the fractions are stored and the row stays ``pending``: :mod:`monitor.pairing` settles it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from geoalchemy2.shape import to_shape
from shapely.geometry.base import BaseGeometry
from sqlalchemy import and_, func, select

from core import observations as job
from core.config import Settings
from core.db import session_scope
from core.models import Area, Catalogue, ObservationStatus, Scene
from eo.cog import CogReadError
from eo.observe import GranuleMask, NoCloudMask, ReadStats, observe_acquisition
from eo.security import HrefRefused

logger = logging.getLogger(__name__)


@dataclass
class RowsObserved:
    """What one call computed: outcomes by status, granule window reads and files opened."""

    computed: int = 0
    by_status: Counter[str] | None = None
    granule_reads: int = 0
    granule_opens: int = 0


@dataclass(frozen=True)
class _Waiting:
    area_id: int
    geom: BaseGeometry
    min_clear: float
    min_covered: float
    max_cloud: float
    granules: tuple[int, ...]  # scene ids of the acquisition's granules touching the area


def observe_rows(settings: Settings, acquisition_id: int, area_ids: list[int] | None = None) -> RowsObserved:
    """Compute and store the due observations of ``acquisition_id`` (only those of ``area_ids`` when given).

    Idempotent: rows no longer due (already computed by another run) are neither read for nor written.
    Read errors become ``failed`` rows; anything else (database down) raises and leaves the rows due.
    """
    with session_scope(settings) as session:
        due = job.due_areas(session, acquisition_id, area_ids)
    done = RowsObserved(by_status=Counter())
    if not due:
        return done
    outcomes, reads = outcomes_for(settings, acquisition_id, due)
    with session_scope(settings) as session:
        job.save(session, acquisition_id, outcomes)
    done.computed = len(outcomes)
    done.by_status.update(o.status.value for o in outcomes.values())
    done.granule_reads = sum(r.reads for r in reads)
    done.granule_opens = sum(r.opens for r in reads)
    return done


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


def outcomes_for(settings: Settings, acquisition_id: int, area_ids: list[int]
                 ) -> tuple[dict[int, job.Outcome], list[ReadStats]]:
    """Outcomes (area id → :class:`core.observations.Outcome`) of one acquisition over the given areas (shared
    mask reads), and what was read. Writes nothing."""
    scenes, waiting = _load(settings, acquisition_id, area_ids)
    outcomes: dict[int, job.Outcome] = {}
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
            outcomes[w.area_id] = job.Outcome(ObservationStatus.PARTIAL, 0.0, None,
                                              "no granule of the acquisition touches the area")
        elif all(c is not None and c > w.max_cloud for c in cover):
            outcomes[w.area_id] = job.Outcome(ObservationStatus.CLOUDY, None, None,
                                              f"scene cloud cover {min(cover):.0f}% is above the area's limit "
                                              f"{w.max_cloud:.0f}% (not read)")
        elif any(g in unusable for g in w.granules):
            outcomes[w.area_id] = job.Outcome(ObservationStatus.FAILED, None, None,
                                              next(unusable[g] for g in w.granules if g in unusable))
        else:
            to_read[w.area_id] = w
    reads: list[ReadStats] = []
    if not to_read:
        return outcomes, reads
    needed = sorted({g for w in to_read.values() for g in w.granules})
    granules = [usable[g] for g in needed]
    try:
        coverage = observe_acquisition(granules, {a: w.geom for a, w in to_read.items()}, stats=reads)
    except (HrefRefused, CogReadError, NoCloudMask) as exc:
        reason = {HrefRefused: "cloud mask href refused: ", CogReadError: "cloud mask unreadable: "}.get(
            type(exc), "")
        for area_id in to_read:
            outcomes[area_id] = job.Outcome(ObservationStatus.FAILED, None, None, f"{reason}{exc}")
        return outcomes, reads
    by_item = {usable[g].item_id: g for g in needed}
    for area_id, w in to_read.items():
        cov = coverage[area_id]
        status, reason = job.classify(cov.covered_fraction, cov.clear_fraction, w.min_covered, w.min_clear)
        first = by_item[cov.granules_used[0]] if cov.granules_used else None
        outcomes[area_id] = job.Outcome(status, cov.covered_fraction, cov.clear_fraction, reason, first)
    return outcomes, reads
