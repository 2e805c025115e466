"""From observed acquisitions to analysis work: the "before" acquisition and the outbox row.

A run (:func:`process_pending`) has two steps:

1. Every pending observation gets its covered and clear fractions, acquisition by acquisition, one mask read
   per granule and window of areas (:mod:`monitor.observations`: sent to the ``cpu`` workers, or computed in
   this process); cloudy, partial and failed ones are settled there.
2. Every computed, clear, still pending observation (an *after* acquisition for its area) whose earlier
   acquisitions of the area are all computed, oldest
   acquisition first and all areas of one acquisition together, looks for its *before* acquisition: same
   constellation, same relative orbit when known, earlier, observed over this area with enough of it
   imaged and clear (any tile, catalogue or collection: acquisitions are mosaics). Policy ``latest``: the
   most recent such acquisition. Policy ``seasonal``: a clear one within :data:`SEASONAL_WINDOW_DAYS` of
   the same day of year, from the most recent earlier year that has one (nearest day of year within that
   year) — the most recent year first because a baseline from years back re-reports every change since then.
   The analysis rows are inserted (status ``pending``, UNIQUE idempotency key of area + both acquisition
   keys) and the observations settled ``clear`` in one transaction per acquisition, before anything is
   enqueued (the dispatcher reads the table: the outbox pattern). So an area gets at most one analysis,
   hence one alert, per acquisition, and a repeated run changes nothing.

Every outcome is written down in words (``observations.reason``, ``analyses.pair_reason``) so "why did I
not get an alert?" has an answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, true
from sqlalchemy.orm import Session, aliased

from core import jobs
from core import observations as observation_job
from core.config import Settings
from core.db import session_scope
from core.models import Acquisition, Area, AreaStatus, Observation, ObservationStatus, PairingPolicy, Scene
from eo.questions import question_set_id
from monitor.catalogues.identity import constellation
from monitor.observations import Sender, dispatch_observations, observe_pending

logger = logging.getLogger(__name__)

PAIRING_POLICY_VERSION = 1
# Seasonal policy: candidates within this many days of the after acquisition's date, in earlier years.
SEASONAL_WINDOW_DAYS = 30
# Earlier acquisitions considered per area (about 15 years of 5-day revisits on one orbit).
MAX_CANDIDATES = 1200


def idempotency_key(area_id: int, after_key: str, before_key: str | None, analyser: str, question_set: str,
                    policy: str) -> str:
    """sha256 of everything that makes an analysis different; UNIQUE in ``analyses``."""
    payload = json.dumps(
        [area_id, after_key, before_key, analyser, question_set, f"{policy}@{PAIRING_POLICY_VERSION}"],
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class PairingStats:
    observations: int = 0
    clear: int = 0
    cloudy: int = 0
    partial: int = 0
    failed: int = 0
    analyses_created: int = 0
    no_before: int = 0
    granule_reads: int = 0
    dispatched: int = 0  # acquisitions sent to the cpu workers to be observed
    analysis_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _After:
    area_id: int
    name: str
    policy: str
    questions: tuple[str, ...]
    min_clear: float
    min_covered: float
    scene_id: int | None
    clear: float
    tiles: tuple[str, ...]


@dataclass(frozen=True)
class _Candidate:
    acquisition_id: int
    key: str
    sensed_at: datetime
    scene_id: int | None
    clear: float
    covered: float | None


@dataclass(frozen=True)
class _Acq:
    id: int
    key: str
    platform: str | None
    sensed_at: datetime
    relative_orbit: int | None


def label(tiles: tuple[str, ...], orbit: int | None) -> str:
    """``tile 34TER orbit R136`` / ``tiles 34TFS+35TKM orbit R036`` (what the after acquisition imaged)."""
    where = (f"tile {tiles[0]}" if len(tiles) == 1 else f"tiles {'+'.join(tiles)}") if tiles else "the acquisition"
    return where + (f" orbit R{orbit:03d}" if orbit is not None else "")


def process_pending(settings: Settings, *, area_ids: Iterable[int] | None = None,
                    limit: int | None = None, progress: Any = None,
                    send_observations: Sender | None = None) -> PairingStats:
    """Compute pending observations (here, or — ``send_observations`` given — by sending them to the ``cpu``
    workers), then pair every computed clear one still pending; create analyses. Idempotent.

    An observation is paired only once every earlier acquisition of its area is computed (workers finish
    acquisitions in any order; the before acquisition must not be chosen while an earlier one is unknown)."""
    area_ids = list(area_ids) if area_ids is not None else None
    if send_observations is not None:
        observed = dispatch_observations(settings, send=send_observations)
    else:
        observed = observe_pending(settings, area_ids=area_ids, limit=limit, progress=progress)
    stats = PairingStats(granule_reads=observed.granule_reads, dispatched=observed.dispatched)
    for status in ("cloudy", "partial", "failed"):
        setattr(stats, status, observed.by_status.get(status, 0))
    stats.observations = stats.cloudy + stats.partial + stats.failed
    earlier = aliased(Observation)
    earlier_acq = aliased(Acquisition)
    waiting_on_earlier = (
        select(earlier.area_id)
        .join(earlier_acq, earlier_acq.id == earlier.acquisition_id)
        .where(earlier.area_id == Observation.area_id, earlier.status == ObservationStatus.PENDING,
               earlier.computed_at.is_(None), earlier_acq.sensed_at < Acquisition.sensed_at)
        .exists()
    )
    query = (
        select(Observation.acquisition_id, Observation.area_id)
        .join(Area, Area.id == Observation.area_id)
        .join(Acquisition, Acquisition.id == Observation.acquisition_id)
        .where(Area.status == AreaStatus.ACTIVE, Observation.status == ObservationStatus.PENDING,
               Observation.computed_at.is_not(None), ~waiting_on_earlier)
        .order_by(Acquisition.sensed_at, Acquisition.id, Observation.area_id)
    )
    if area_ids is not None:
        query = query.where(Observation.area_id.in_(area_ids))
    groups: dict[int, list[int]] = {}
    with session_scope(settings) as session:
        for row in session.execute(query):
            groups.setdefault(row.acquisition_id, []).append(row.area_id)
    analyser = jobs.requested_analyser(settings).requested()
    for acquisition_id, ids in groups.items():
        try:
            pair_acquisition(settings, acquisition_id, ids, analyser, stats)
        except Exception:
            # One broken acquisition must not stop the others; its rows stay pending, retried next run.
            logger.exception("pairing acquisition %d for %d areas failed; will retry", acquisition_id, len(ids))
    if groups or observed.computed:
        logger.info("pairing: %d observations (%d clear, %d cloudy, %d partial, %d failed), %d analyses created, "
                    "%d clear acquisitions without an earlier clear one, %d granule mask reads", stats.observations,
                    stats.clear, stats.cloudy, stats.partial, stats.failed, stats.analyses_created, stats.no_before,
                    stats.granule_reads)
    return stats


def _afters(session: Session, acquisition_id: int, area_ids: list[int]) -> dict[int, _After]:
    tiles = (
        select(func.array_agg(func.distinct(Scene.tile)))
        .where(Scene.acquisition_id == acquisition_id, Scene.tile.is_not(None),
               func.ST_Intersects(Scene.footprint, Area.geom))
        .correlate(Area).scalar_subquery()
    )
    rows = session.execute(
        select(Area.id, Area.name, Area.pairing_policy, Area.questions, Area.min_clear_fraction,
               Area.min_covered_fraction, Observation.scene_id, Observation.clear_fraction, tiles.label("tiles"))
        .join(Observation, and_(Observation.area_id == Area.id, Observation.acquisition_id == acquisition_id))
        .where(Area.id.in_(area_ids), Observation.status == ObservationStatus.PENDING,
               Observation.clear_fraction.is_not(None))
    )
    return {r.id: _After(r.id, r.name, PairingPolicy(r.pairing_policy).value, tuple(r.questions or ()),
                         float(r.min_clear_fraction), float(r.min_covered_fraction), r.scene_id,
                         float(r.clear_fraction), tuple(sorted(r.tiles or ()))) for r in rows}


def _candidates(session: Session, after: _Acq, area_ids: list[int]) -> dict[int, list[_Candidate]]:
    """Earlier observed-clear-enough acquisitions per area (same constellation, same orbit when known),
    newest first. Only rows with fractions: a poll offers every acquisition touching an area, and the oldest
    are observed first, so an earlier acquisition of the area has its row by now."""
    orbit_ok = (
        true() if after.relative_orbit is None
        else or_(Acquisition.relative_orbit.is_(None), Acquisition.relative_orbit == after.relative_orbit)
    )
    ranked = (
        select(Observation.area_id, Acquisition.id, Acquisition.key, Acquisition.sensed_at, Observation.scene_id,
               Observation.clear_fraction, Observation.covered_fraction,
               func.row_number().over(partition_by=Observation.area_id,
                                      order_by=(Acquisition.sensed_at.desc(), Acquisition.id.desc())).label("n"))
        .join(Acquisition, Acquisition.id == Observation.acquisition_id)
        .where(Observation.area_id.in_(area_ids),
               Observation.status.in_([ObservationStatus.CLEAR, ObservationStatus.PENDING]),
               Observation.computed_at.is_not(None), Observation.clear_fraction.is_not(None),
               Observation.scene_id.is_not(None),
               Acquisition.platform.like(f"{constellation(after.platform)}%"), orbit_ok,
               Acquisition.sensed_at < after.sensed_at, Acquisition.id != after.id)
        .subquery()
    )
    out: dict[int, list[_Candidate]] = {a: [] for a in area_ids}
    for r in session.execute(select(ranked).where(ranked.c.n <= MAX_CANDIDATES)
                             .order_by(ranked.c.area_id, ranked.c.n)):
        out[r.area_id].append(_Candidate(r.id, r.key, r.sensed_at, r.scene_id, float(r.clear_fraction),
                                         r.covered_fraction))
    return out


def pair_acquisition(settings: Settings, acquisition_id: int, area_ids: list[int], analyser: jobs.AnalyserSpec,
                     stats: PairingStats) -> None:
    """Settle the clear observations of one acquisition over ``area_ids``: before acquisition, analysis row."""
    with session_scope(settings) as session:
        acq = session.get(Acquisition, acquisition_id)
        after = _Acq(acq.id, acq.key, acq.platform, acq.sensed_at, acq.relative_orbit)
        afters = _afters(session, acquisition_id, area_ids)
        candidates = _candidates(session, after, list(afters))
        analyses: list[dict[str, Any]] = []
        settled: dict[int, str] = {}
        for area_id, area in afters.items():
            before, reason = choose_before(area, after, candidates[area_id])
            settled[area_id] = reason
            stats.observations += 1
            stats.clear += 1
            if before is None:
                stats.no_before += 1
                continue
            question_set = question_set_id(area.questions)
            analyses.append({
                "idempotency_key": idempotency_key(area_id, after.key, before.key, analyser.id, question_set,
                                                   area.policy),
                "area_id": area_id, "after_scene_id": area.scene_id, "before_scene_id": before.scene_id,
                "question_set": question_set, "pairing_policy": area.policy, "pair_reason": reason,
            })
        created = jobs.create_pending_many(session, analyses, analyser=analyser)
        observation_job.settle_clear(session, acquisition_id, settled)
    stats.analyses_created += len(created)
    stats.analysis_ids.extend(created)


def choose_before(area: _After, after: _Acq, candidates: list[_Candidate]) -> tuple[_Candidate | None, str]:
    """The before acquisition for ``after`` over ``area`` and the human-readable reason (or why there is none)."""
    seasonal = area.policy == PairingPolicy.SEASONAL.value
    if seasonal:
        ranked = []
        for cand in candidates:
            match = seasonal_match(cand.sensed_at, after.sensed_at)
            if match is not None and match[1] <= SEASONAL_WINDOW_DAYS:
                ranked.append((match, -cand.sensed_at.timestamp(), cand))
        ranked.sort(key=lambda r: (r[0], r[1]))  # fewest years back, then nearest day of year, then newest
        ordered = [(match[1], cand) for match, _, cand in ranked]
    else:
        ordered = [(None, cand) for cand in candidates]  # already newest first
    where = label(area.tiles, after.relative_orbit)
    checked = 0
    for offset, cand in ordered:
        checked += 1
        if cand.clear < area.min_clear or (cand.covered is not None and cand.covered < area.min_covered):
            continue
        day = cand.sensed_at.date().isoformat()
        if seasonal:
            years_back, _ = seasonal_match(cand.sensed_at, after.sensed_at) or (0, 0)
            same_day = _same_day_in_year(after.sensed_at, after.sensed_at.year - years_back)
            return cand, (
                f"seasonal baseline: clear acquisition of {where} near the same day of year in the most "
                f"recent earlier year that has one: {day} (clear {100 * cand.clear:.0f}%, {offset} days from "
                f"{same_day.date().isoformat()})"
            )
        return cand, f"latest earlier clear acquisition of {where}: {day} (clear {100 * cand.clear:.0f}%)"
    need = f"≥ {100 * area.min_clear:.0f}% clear over the area"
    if seasonal:
        return None, (f"no clear acquisition of {where} within ±{SEASONAL_WINDOW_DAYS} days of the same "
                      f"day of year in earlier years ({need}; {checked} candidates checked)")
    return None, f"no earlier clear acquisition of {where} ({need}; {checked} candidates checked)"


def seasonal_match(candidate: datetime, after: datetime) -> tuple[int, int] | None:
    """(years back, days off): the after acquisition's date moved into the earlier year nearest ``candidate``,
    how many years that is before ``after``'s year, and how many days the candidate is from it.

    None when the candidate is not at least ~a year older (an acquisition from last month is not a seasonal
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
