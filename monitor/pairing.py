"""From new scenes to analysis work: AOI clear fraction, choice of the "before" scene, the outbox row.

For every pending observation (an active area × a scene a poll returned for it), oldest acquisition
first so earlier scenes are settled before later ones look for a partner:

1. AOI clear fraction from the scene's cloud mask — SCL (Sentinel-2) or QA_PIXEL bits (Landsat) — by a
   windowed COG read of the area only. Below the area's ``min_clear_fraction`` → ``cloudy`` with the
   reason; unreadable → ``failed`` with the reason (retried on later runs for a while).
2. A clear scene looks for its *before* scene: same tile and constellation (any catalogue or collection:
   a granule's stored version is the best one whatever served it), same relative orbit
   when known, intersecting the area, earlier, clear enough for this area (computing that observation if
   it is missing). Policy ``latest``: the most recent such scene. Policy ``seasonal``: a clear one within
   :data:`SEASONAL_WINDOW_DAYS` of the same day of year, from the most recent earlier year that has one
   (nearest day of year within that year). The most recent year first because a baseline from years
   back re-reports every change since then (2020-08-29 against 2015-08-31 re-alerts five years of cuts).
3. The analysis row is inserted (status ``pending``) with a UNIQUE idempotency key — before anything is
   enqueued (the dispatcher reads the table: the outbox pattern). A repeated run changes nothing.

Every outcome is written down in words (``observations.reason``, ``analyses.pair_reason``) so "why did I
not get an alert?" has an answer.

Observation rows: ``pending`` = a poll offered this scene to this area and it has not been settled as an
"after" scene yet (it may already carry a ``clear_fraction`` computed when a later scene considered it as
a before-candidate; that is reused). Rows for older scenes computed only as before-candidates are
written directly as ``clear``/``cloudy`` and never become "after" scenes themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from geoalchemy2.shape import to_shape
from shapely.geometry.base import BaseGeometry
from sqlalchemy import and_, func, or_, select, true
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core import jobs
from core.config import CatalogueSettings, Settings
from core.db import session_scope
from core.models import (
    Area,
    AreaStatus,
    Catalogue,
    Observation,
    ObservationStatus,
    PairingPolicy,
    Scene,
)
from eo.cog import CogReadError, read_aoi, utm_crs_for
from eo.masks import MASK_BANDS, clear_fraction
from eo.security import HrefRefused
from monitor.catalogues.identity import constellation

logger = logging.getLogger(__name__)

QUESTION_SET_VERSION = 1
PAIRING_POLICY_VERSION = 1
# Seasonal policy: candidates within this many days of the after scene's date, in earlier years.
SEASONAL_WINDOW_DAYS = 30
# At most this many before-candidates get their clear fraction *computed* per after scene (COG reads);
# candidates with a known observation are free.
MAX_CANDIDATE_READS = 12
# Earlier scenes considered per after scene (about 15 years of 5-day revisits on one orbit).
MAX_CANDIDATES = 1200
# Clear-fraction reads are capped at about this many pixels (a coarser grid for very large areas).
MAX_MASK_PIXELS = 4_000_000
# Failed observations (unreadable COG, network) are retried on later runs for this long.
FAILED_RETRY_AFTER = timedelta(hours=1)
FAILED_GIVE_UP_AFTER = timedelta(days=3)


# --- identifiers -----------------------------------------------------------------------------------


def question_set_id(questions: Iterable[str] | None) -> str:
    return ",".join(sorted(set(questions or []))) + f"@{QUESTION_SET_VERSION}"


def idempotency_key(area_id: int, after_key: str, before_key: str | None, analyser: str, question_set: str,
                    policy: str) -> str:
    """sha256 of everything that makes an analysis different; UNIQUE in ``analyses``."""
    payload = json.dumps(
        [area_id, after_key, before_key, analyser, question_set, f"{policy}@{PAIRING_POLICY_VERSION}"],
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


# --- clear fraction --------------------------------------------------------------------------------


class NoCloudMask(LookupError):
    """The scene has neither an SCL nor a QA_PIXEL asset."""


def aoi_clear_fraction(assets: dict[str, Any], geom: BaseGeometry, area_km2: float,
                       catalogue: CatalogueSettings) -> float:
    """AOI clear fraction of one scene (windowed COG read of its cloud-mask asset)."""
    grid: dict[str, Any] = {}
    if area_km2 * 1e6 / (20.0 * 20.0) > MAX_MASK_PIXELS:
        # Very large areas: a coarser metric grid keeps the read bounded (a fraction needs no detail).
        grid = {"dst_crs": utm_crs_for(geom), "resolution": math.sqrt(area_km2 * 1e6 / MAX_MASK_PIXELS)}
    for band in MASK_BANDS:
        if band in assets:
            raster = read_aoi(assets[band]["href"], geom, catalogue=catalogue, indexes=1, **grid)
            return clear_fraction(band, raster.array[0], raster.mask)
    raise NoCloudMask("the scene has no SCL or QA_PIXEL asset")


# --- plain snapshots (so no ORM object is used across transactions or while reading COGs) -----------


@dataclass(frozen=True)
class AreaInfo:
    id: int
    name: str
    geom: BaseGeometry
    area_km2: float
    min_clear_fraction: float
    max_cloud_cover: float
    policy: str
    questions: tuple[str, ...]


@dataclass(frozen=True)
class SceneInfo:
    id: int
    catalogue_id: int
    catalogue_name: str
    collection: str
    acquisition_key: str
    item_id: str
    tile: str | None
    relative_orbit: int | None
    acquired_at: datetime
    cloud_cover: float | None
    assets: dict[str, Any]
    platform: str | None = None

    def label(self) -> str:
        tile = f"tile {self.tile}" if self.tile else f"scene {self.item_id}"
        orbit = f" orbit R{self.relative_orbit:03d}" if self.relative_orbit is not None else ""
        return tile + orbit


@dataclass
class Outcome:
    status: ObservationStatus
    fraction: float | None
    reason: str | None


@dataclass
class PairingStats:
    observations: int = 0
    clear: int = 0
    cloudy: int = 0
    failed: int = 0
    analyses_created: int = 0
    no_before: int = 0
    analysis_ids: list[int] = field(default_factory=list)

    def add(self, other: PairingStats) -> None:
        for name in ("observations", "clear", "cloudy", "failed", "analyses_created", "no_before"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.analysis_ids.extend(other.analysis_ids)


def _area_info(area: Area) -> AreaInfo:
    return AreaInfo(
        id=area.id, name=area.name, geom=to_shape(area.geom), area_km2=float(area.area_km2),
        min_clear_fraction=float(area.min_clear_fraction), max_cloud_cover=float(area.max_cloud_cover),
        policy=PairingPolicy(area.pairing_policy).value, questions=tuple(area.questions or ()),
    )


def _scene_info(scene: Scene, catalogue_name: str) -> SceneInfo:
    return SceneInfo(
        id=scene.id, catalogue_id=scene.catalogue_id, catalogue_name=catalogue_name, collection=scene.collection,
        acquisition_key=scene.acquisition_key, item_id=scene.item_id, tile=scene.tile,
        relative_orbit=scene.relative_orbit, acquired_at=scene.acquired_at, cloud_cover=scene.cloud_cover,
        assets=dict(scene.assets or {}), platform=scene.platform,
    )


# --- the pairing run -------------------------------------------------------------------------------


def process_pending(settings: Settings, *, area_ids: Iterable[int] | None = None,
                    limit: int | None = None, progress: Any = None) -> PairingStats:
    """Settle pending observations (and failed ones due for a retry); create analyses. Idempotent."""
    now = datetime.now(UTC)
    with session_scope(settings) as session:
        query = (
            select(Observation.area_id, Observation.scene_id)
            .join(Scene, Scene.id == Observation.scene_id)
            .join(Area, Area.id == Observation.area_id)
            .where(
                Area.status == AreaStatus.ACTIVE,
                or_(
                    Observation.status == ObservationStatus.PENDING,
                    and_(
                        Observation.status == ObservationStatus.FAILED,
                        Observation.computed_at < now - FAILED_RETRY_AFTER,
                        Observation.created_at > now - FAILED_GIVE_UP_AFTER,
                    ),
                ),
            )
            .order_by(Observation.area_id, Scene.acquired_at, Scene.id)
        )
        if area_ids is not None:
            query = query.where(Observation.area_id.in_(list(area_ids)))
        if limit is not None:
            query = query.limit(limit)
        todo = [(row.area_id, row.scene_id) for row in session.execute(query)]
    if progress is not None:
        progress.reset(total=len(todo))
    stats = PairingStats()
    analyser = jobs.requested_analyser(settings)
    for area_id, scene_id in todo:
        try:
            stats.add(pair_observation(area_id, scene_id, settings, analyser=analyser))
        except Exception:
            # One broken pair must not stop the others; it stays pending and is retried next run.
            logger.exception("pairing area %d × scene %d failed; will retry", area_id, scene_id)
        if progress is not None:
            progress.update(1)
    if todo:
        logger.info("pairing: %d observations (%d clear, %d cloudy, %d failed), %d analyses created, "
                    "%d clear scenes without an earlier clear one", stats.observations, stats.clear, stats.cloudy,
                    stats.failed, stats.analyses_created, stats.no_before)
    return stats


def pair_observation(area_id: int, scene_id: int, settings: Settings, *,
                     analyser: jobs.AnalyserSpec | None = None) -> PairingStats:
    """Settle one (area, after scene) observation: clear fraction, before scene, analysis row."""
    stats = PairingStats(observations=1)
    loaded = _load(area_id, scene_id, settings)
    if loaded is None:
        return PairingStats()
    area, scene, known = loaded
    try:
        catalogue = settings.catalogue(scene.catalogue_name)
    except KeyError:
        # The scene's catalogue was removed from the settings: its hrefs have no allow-list any more.
        outcome = Outcome(ObservationStatus.FAILED, None,
                          f"catalogue {scene.catalogue_name!r} is no longer configured; its assets are not opened")
        _save_observation(settings, area.id, scene.id, outcome)
        stats.failed = 1
        return stats

    outcome = known if known is not None else _observe(area, scene, catalogue)
    if outcome.status is not ObservationStatus.CLEAR:
        setattr(stats, outcome.status.value, 1)
        _save_observation(settings, area.id, scene.id, outcome)
        return stats
    stats.clear = 1

    before, reason = choose_before(area, scene, settings)
    if before is None:
        stats.no_before = 1
        _save_observation(settings, area.id, scene.id, Outcome(ObservationStatus.CLEAR, outcome.fraction, reason))
        logger.info("area %r: %s is clear (%.0f%%) but %s", area.name, scene.item_id, 100 * outcome.fraction, reason)
        return stats

    analyser = (analyser or jobs.requested_analyser(settings)).requested()
    question_set = question_set_id(area.questions)
    key = idempotency_key(area.id, scene.acquisition_key, before.acquisition_key, analyser.id, question_set,
                          area.policy)
    with session_scope(settings) as session:
        analysis_id = jobs.create_pending(
            session, idempotency_key=key, area_id=area.id, after_scene_id=scene.id, before_scene_id=before.id,
            analyser=analyser, question_set=question_set, pairing_policy=area.policy, pair_reason=reason)
        _save_observation(settings, area.id, scene.id, Outcome(ObservationStatus.CLEAR, outcome.fraction, reason),
                          session=session)
    if analysis_id is not None:
        stats.analyses_created = 1
        stats.analysis_ids.append(analysis_id)
        logger.info("area %r: analysis %d created for %s vs %s (%s)", area.name, analysis_id, scene.item_id,
                    before.item_id, reason)
    return stats


def _load(area_id: int, scene_id: int, settings: Settings) -> tuple[AreaInfo, SceneInfo, Outcome | None] | None:
    with session_scope(settings) as session:
        row = session.execute(
            select(Area, Scene, Catalogue.name, Observation)
            .join(Observation, and_(Observation.area_id == Area.id, Observation.scene_id == scene_id))
            .join(Scene, Scene.id == Observation.scene_id)
            .join(Catalogue, Catalogue.id == Scene.catalogue_id)
            .where(Area.id == area_id)
        ).one_or_none()
        if row is None:
            return None
        area, scene, catalogue_name, observation = row
        known = None
        if observation.computed_at is not None and observation.clear_fraction is not None \
                and observation.status in (ObservationStatus.PENDING, ObservationStatus.CLEAR):
            # Computed earlier as someone's before-candidate: reuse the fraction, decide again.
            known = _classify(observation.clear_fraction, float(area.min_clear_fraction))
        return _area_info(area), _scene_info(scene, catalogue_name), known


def _classify(fraction: float, threshold: float) -> Outcome:
    if fraction >= threshold:
        return Outcome(ObservationStatus.CLEAR, fraction, None)
    return Outcome(ObservationStatus.CLOUDY, fraction,
                   f"AOI clear fraction {100 * fraction:.0f}% is below the area's minimum {100 * threshold:.0f}%")


def _observe(area: AreaInfo, scene: SceneInfo, catalogue: CatalogueSettings) -> Outcome:
    if scene.cloud_cover is not None and scene.cloud_cover > area.max_cloud_cover:
        return Outcome(ObservationStatus.CLOUDY, None,
                       f"scene cloud cover {scene.cloud_cover:.0f}% is above the area's limit "
                       f"{area.max_cloud_cover:.0f}% (not read)")
    try:
        fraction = aoi_clear_fraction(scene.assets, area.geom, area.area_km2, catalogue)
    except HrefRefused as exc:
        return Outcome(ObservationStatus.FAILED, None, f"cloud mask href refused: {exc}")
    except CogReadError as exc:
        return Outcome(ObservationStatus.FAILED, None, f"cloud mask unreadable: {exc}")
    except NoCloudMask as exc:
        return Outcome(ObservationStatus.FAILED, None, str(exc))
    return _classify(fraction, area.min_clear_fraction)


def _save_observation(settings: Settings, area_id: int, scene_id: int, outcome: Outcome, *,
                      session: Session | None = None,
                      keep_pending: bool = False) -> None:
    values: dict[str, Any] = {"clear_fraction": outcome.fraction, "computed_at": func.now()}
    if not keep_pending:
        values.update(status=outcome.status, reason=outcome.reason)
    stmt = (
        insert(Observation)
        .values(area_id=area_id, scene_id=scene_id, status=outcome.status, clear_fraction=outcome.fraction,
                reason=outcome.reason, computed_at=func.now())
        .on_conflict_do_update(index_elements=[Observation.area_id, Observation.scene_id], set_=values)
    )
    if session is not None:
        session.execute(stmt)
        return
    with session_scope(settings) as own:
        own.execute(stmt)


# --- choosing the before scene ---------------------------------------------------------------------


@dataclass
class _Candidate:
    scene: SceneInfo
    status: ObservationStatus | None
    fraction: float | None


def choose_before(area: AreaInfo, after: SceneInfo, settings: Settings) -> tuple[SceneInfo | None, str]:
    """The before scene for ``after`` over ``area`` and the human-readable reason (or why there is none)."""
    candidates = _candidates(area, after, settings)
    seasonal = area.policy == PairingPolicy.SEASONAL.value
    if seasonal:
        ranked = []
        for cand in candidates:
            match = seasonal_match(cand.scene.acquired_at, after.acquired_at)
            if match is not None and match[1] <= SEASONAL_WINDOW_DAYS:
                ranked.append((match, -cand.scene.acquired_at.timestamp(), cand))
        ranked.sort(key=lambda r: (r[0], r[1]))  # fewest years back, then nearest day of year, then newest
        ordered = [(match[1], cand) for match, _, cand in ranked]
    else:
        ordered = [(None, cand) for cand in candidates]  # already newest first

    reads = 0
    checked = 0
    for offset, cand in ordered:
        fraction, status = cand.fraction, cand.status
        if fraction is None and status is ObservationStatus.CLOUDY:
            checked += 1  # ruled out by its scene-level cloud cover
            continue
        if fraction is None:
            if reads >= MAX_CANDIDATE_READS:
                break
            reads += 1
            try:
                catalogue = settings.catalogue(cand.scene.catalogue_name)
            except KeyError:  # its catalogue is no longer configured: its hrefs are not opened
                checked += 1
                continue
            outcome = _observe(area, cand.scene, catalogue)
            fraction = outcome.fraction
            if outcome.status is ObservationStatus.FAILED:
                # Not stored for a scene nobody observed yet: a stored failure would be retried as if it were
                # a new "after" scene. It is simply tried again by the next after scene that needs it.
                logger.warning("area %r: before-candidate %s unreadable: %s", area.name, cand.scene.item_id,
                               outcome.reason)
                if status is None:
                    checked += 1
                    continue
            if status is ObservationStatus.FAILED and outcome.status is ObservationStatus.CLEAR:
                # A failed "after" scene that reads now still needs its own pairing: pending again, fraction kept.
                outcome = Outcome(ObservationStatus.PENDING, outcome.fraction, None)
            # A pending candidate is still someone's "after" scene: store the fraction, keep it pending.
            _save_observation(settings, area.id, cand.scene.id, outcome,
                              keep_pending=status is ObservationStatus.PENDING)
        checked += 1
        if fraction is None or fraction < area.min_clear_fraction:
            continue
        day = cand.scene.acquired_at.date().isoformat()
        if seasonal:
            years_back, _ = seasonal_match(cand.scene.acquired_at, after.acquired_at) or (0, 0)
            same_day = _same_day_in_year(after.acquired_at, after.acquired_at.year - years_back)
            return cand.scene, (
                f"seasonal baseline: clear acquisition of {after.label()} near the same day of year in the most "
                f"recent earlier year that has one: {day} (clear {100 * fraction:.0f}%, {offset} days from "
                f"{same_day.date().isoformat()})"
            )
        return cand.scene, f"latest earlier clear acquisition of {after.label()}: {day} (clear {100 * fraction:.0f}%)"

    need = f"≥ {100 * area.min_clear_fraction:.0f}% clear over the area"
    if seasonal:
        return None, (f"no clear acquisition of {after.label()} within ±{SEASONAL_WINDOW_DAYS} days of the same "
                      f"day of year in earlier years ({need}; {checked} candidates checked)")
    return None, f"no earlier clear acquisition of {after.label()} ({need}; {checked} candidates checked)"


def _candidates(area: AreaInfo, after: SceneInfo, settings: Settings) -> list[_Candidate]:
    """Earlier scenes of the same tile (and orbit when known) over the area, newest first, with what is
    already known about them for this area. The raw item JSON is not loaded (it can be large)."""
    orbit_ok = (
        true() if after.relative_orbit is None
        else or_(Scene.relative_orbit.is_(None), Scene.relative_orbit == after.relative_orbit)
    )
    columns = (Scene.id, Scene.catalogue_id, Catalogue.name.label("catalogue_name"), Scene.collection,
               Scene.acquisition_key, Scene.item_id, Scene.tile,
               Scene.relative_orbit, Scene.acquired_at, Scene.cloud_cover, Scene.assets, Scene.platform)
    with session_scope(settings) as session:
        rows = session.execute(
            select(*columns, Observation.status, Observation.clear_fraction, Observation.computed_at)
            .outerjoin(Observation, and_(Observation.scene_id == Scene.id, Observation.area_id == area.id))
            .join(Catalogue, Catalogue.id == Scene.catalogue_id)
            .join(Area, Area.id == area.id)
            .where(
                Scene.platform.like(f"{constellation(after.platform)}%"),
                Scene.tile.is_not_distinct_from(after.tile),
                orbit_ok,
                Scene.acquired_at < after.acquired_at,
                Scene.id != after.id,
                func.ST_Intersects(Scene.footprint, Area.geom),
            )
            .order_by(Scene.acquired_at.desc(), Scene.id.desc())
            .limit(MAX_CANDIDATES)
        ).all()
    return [
        _Candidate(
            scene=SceneInfo(
                id=r.id, catalogue_id=r.catalogue_id, catalogue_name=r.catalogue_name, collection=r.collection,
                acquisition_key=r.acquisition_key, item_id=r.item_id, tile=r.tile, relative_orbit=r.relative_orbit,
                acquired_at=r.acquired_at, cloud_cover=r.cloud_cover, assets=dict(r.assets or {}),
                platform=r.platform,
            ),
            status=r.status,
            fraction=r.clear_fraction if r.computed_at is not None else None,
        )
        for r in rows
    ]


def seasonal_match(candidate: datetime, after: datetime) -> tuple[int, int] | None:
    """(years back, days off): the after scene's date moved into the earlier year nearest ``candidate``,
    how many years that is before ``after``'s year, and how many days the candidate is from it.

    None when the candidate is not at least ~a year older (a scene from last month is not a seasonal
    baseline even if, across New Year, it is close in day of year).
    """
    if candidate > after - timedelta(days=300):
        return None
    best: tuple[int, int] | None = None
    for year in (candidate.year - 1, candidate.year, candidate.year + 1):
        if year >= after.year:
            continue
        moved = _same_day_in_year(after, year)
        offset = abs((candidate.date() - moved.date()).days)
        if best is None or offset < best[1]:
            best = (after.year - year, offset)
    return best


def _same_day_in_year(when: datetime, year: int) -> datetime:
    try:
        return when.replace(year=year)
    except ValueError:  # 29 February in a non-leap year
        return when.replace(year=year, day=28)
