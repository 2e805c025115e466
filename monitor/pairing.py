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

from sqlalchemy import select, text

from core import jobs
from core import observations as observation_job
from core.config import Settings
from core.db import session_scope
from core.models import Acquisition, AreaStatus, ObservationStatus, PairingPolicy
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
    gave_up: int = 0  # of the failed: given up this pass (started too many times without an outcome)
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
    stats.gave_up = observed.gave_up
    stats.failed += stats.gave_up
    stats.observations = stats.cloudy + stats.partial + stats.failed
    groups: dict[int, list[int]] = {}
    with session_scope(settings) as session:
        refresh_statistics(session)
    with session_scope(settings) as session:
        rows = session.execute(_READY.bindparams(areas=area_ids) if area_ids is not None else _READY_ALL)
        for row in rows:
            groups.setdefault(row.acquisition_id, []).append(row.area_id)
    analyser = jobs.requested_analyser(settings).requested()
    for batch in _batches(groups):
        try:
            pair_acquisitions(settings, batch, analyser, stats)
        except Exception:
            if len(batch) == 1:
                # One broken acquisition must not stop the others; its rows stay pending, retried next run.
                (acquisition_id, ids), = batch.items()
                logger.exception("pairing acquisition %d for %d areas failed; will retry", acquisition_id, len(ids))
                continue
            # Find the broken acquisition: the others of the batch are settled one by one.
            logger.warning("pairing a batch of %d acquisitions failed; pairing them one by one", len(batch))
            for acquisition_id, ids in batch.items():
                try:
                    pair_acquisitions(settings, {acquisition_id: ids}, analyser, stats)
                except Exception:
                    logger.exception("pairing acquisition %d for %d areas failed; will retry", acquisition_id,
                                     len(ids))
    if groups or observed.computed or observed.gave_up:
        logger.info("pairing: %d observations (%d clear, %d cloudy, %d partial, %d failed%s), %d analyses created, "
                    "%d clear acquisitions without an earlier clear one, %d granule mask reads", stats.observations,
                    stats.clear, stats.cloudy, stats.partial, stats.failed,
                    f" of which {stats.gave_up} given up" if stats.gave_up else "", stats.analyses_created,
                    stats.no_before, stats.granule_reads)
    return stats


# Tables whose row estimates the pairing queries' plans hang on, and when their statistics are refreshed here:
# never analysed, or more rows changed since the last ANALYZE than this share of the table (plus a floor).
# A poll adds thousands of rows and the workers then fill them in, faster than autovacuum re-analyses (at
# best every minute, later on a busy machine): planned on a never-analysed observations table, the candidates
# query probed the primary key once per (area, earlier acquisition) pair and one pass took 135 s for 5,500
# rows (bench_pairing's Europe cycle; 0.3 s analysed).
STATISTICS_TABLES = ("observations", "acquisitions")
STALE_SHARE = 0.2
STALE_ROWS = 1000
_STALE = text("""
    SELECT c.relname FROM pg_class c JOIN pg_stat_user_tables t ON t.relid = c.oid
     WHERE c.relname = ANY(:tables) AND t.schemaname = current_schema()
       AND (c.reltuples < 0 OR t.n_mod_since_analyze > :share * c.reltuples + :floor)
     ORDER BY c.relname""")


def refresh_statistics(session: Any) -> list[str]:
    """ANALYZE the tables of :data:`STATISTICS_TABLES` whose statistics are missing or stale; returns their names.
    ANALYZE samples a fixed number of rows (~30,000), so it costs about the same at any table size."""
    stale = [r.relname for r in session.execute(_STALE, {"tables": list(STATISTICS_TABLES), "share": STALE_SHARE,
                                                          "floor": STALE_ROWS})]
    for name in stale:
        if name in STATISTICS_TABLES:  # a known name, never text from outside
            session.execute(text(f"ANALYZE {name}"))
    return stale


# Computed clear rows whose earlier acquisitions of the area are all computed, oldest acquisition first. The
# earliest uncomputed acquisition per area is aggregated once (a correlated NOT EXISTS per row, planned on the
# row estimates of a table a poll has just filled, took 19 s for 22,000 rows).
_READY_SQL = f"""
    WITH waiting AS (
        SELECT e.area_id, min(eq.sensed_at) AS first_sensed
          FROM observations e JOIN acquisitions eq ON eq.id = e.acquisition_id
         WHERE e.status = '{ObservationStatus.PENDING.value}' AND e.computed_at IS NULL
         GROUP BY e.area_id)
    SELECT o.acquisition_id, o.area_id
      FROM observations o
      JOIN areas a ON a.id = o.area_id
      JOIN acquisitions q ON q.id = o.acquisition_id
      LEFT JOIN waiting w ON w.area_id = o.area_id
     WHERE a.status = '{AreaStatus.ACTIVE.value}' AND o.status = '{ObservationStatus.PENDING.value}'
       AND o.computed_at IS NOT NULL AND (w.first_sensed IS NULL OR w.first_sensed >= q.sensed_at) {{only}}
     ORDER BY q.sensed_at, q.id, o.area_id"""  # noqa: S608 — only enum values are interpolated
_READY_ALL = text(_READY_SQL.format(only=""))
_READY = text(_READY_SQL.format(only="AND o.area_id = ANY(:areas)"))
# Observations paired in one transaction (whole acquisitions; a batch that fails is retried one by one).
BATCH_ROWS = 5000


def _batches(groups: dict[int, list[int]]) -> Iterable[dict[int, list[int]]]:
    batch: dict[int, list[int]] = {}
    rows = 0
    for acquisition_id, ids in groups.items():
        batch[acquisition_id] = ids
        rows += len(ids)
        if rows >= BATCH_ROWS:
            yield batch
            batch, rows = {}, 0
    if batch:
        yield batch


# The (acquisition, area) pairs asked for, as two parallel arrays.
_WANTED = "SELECT * FROM unnest(CAST(:acqs AS bigint[]), CAST(:areas AS bigint[])) AS w(acquisition_id, area_id)"

_AFTERS = text(f"""
    WITH wanted AS ({_WANTED})
    SELECT o.acquisition_id, a.id, a.name, a.pairing_policy::text AS policy, a.questions, a.min_clear_fraction,
           a.min_covered_fraction, o.scene_id, o.clear_fraction,
           (SELECT array_agg(DISTINCT s.tile) FROM scenes s
             WHERE s.acquisition_id = o.acquisition_id AND s.tile IS NOT NULL
               AND ST_Intersects(s.footprint, a.geom)) AS tiles
      FROM wanted w
      JOIN observations o ON o.acquisition_id = w.acquisition_id AND o.area_id = w.area_id
      JOIN areas a ON a.id = o.area_id
     WHERE o.status = '{ObservationStatus.PENDING.value}' AND o.clear_fraction IS NOT NULL
     ORDER BY o.acquisition_id, a.id""")  # noqa: S608 — only enum values are interpolated

# Earlier observed-clear-enough acquisitions per (after acquisition, area): same constellation (the after's
# platform LIKE pattern), same orbit when known, newest first, at most MAX_CANDIDATES each.
_CANDIDATES = text(f"""
    WITH wanted AS ({_WANTED}),
    after AS (
        SELECT w.acquisition_id, w.area_id, q.sensed_at, q.relative_orbit, p.pattern
          FROM wanted w JOIN acquisitions q ON q.id = w.acquisition_id
          JOIN unnest(CAST(:pacqs AS bigint[]), CAST(:patterns AS text[])) AS p(acquisition_id, pattern)
            ON p.acquisition_id = w.acquisition_id),
    ranked AS (
        SELECT af.acquisition_id AS after_id, o.area_id, c.id, c.key, c.sensed_at, o.scene_id, o.clear_fraction,
               o.covered_fraction,
               row_number() OVER (PARTITION BY af.acquisition_id, o.area_id
                                  ORDER BY c.sensed_at DESC, c.id DESC) AS n
          FROM after af
          JOIN observations o ON o.area_id = af.area_id
          JOIN acquisitions c ON c.id = o.acquisition_id
         WHERE o.status IN ('{ObservationStatus.CLEAR.value}', '{ObservationStatus.PENDING.value}')
           AND o.computed_at IS NOT NULL AND o.clear_fraction IS NOT NULL AND o.scene_id IS NOT NULL
           AND c.platform LIKE af.pattern
           AND (af.relative_orbit IS NULL OR c.relative_orbit IS NULL OR c.relative_orbit = af.relative_orbit)
           AND c.sensed_at < af.sensed_at AND c.id <> af.acquisition_id)
    SELECT * FROM ranked WHERE n <= :limit ORDER BY after_id, area_id, n""")  # noqa: S608


def pair_acquisitions(settings: Settings, groups: dict[int, list[int]], analyser: jobs.AnalyserSpec,
                      stats: PairingStats) -> None:
    """Settle the clear observations of several acquisitions (acquisition id → area ids) in one transaction:
    before acquisition, analysis row. The same choice per (acquisition, area) as one at a time: candidates are
    computed rows, whatever this run settles."""
    acqs = [q for q, ids in groups.items() for _ in ids]
    areas = [a for ids in groups.values() for a in ids]
    with session_scope(settings) as session:
        info = {r.id: _Acq(r.id, r.key, r.platform, r.sensed_at, r.relative_orbit) for r in session.execute(
            select(Acquisition.id, Acquisition.key, Acquisition.platform, Acquisition.sensed_at,
                   Acquisition.relative_orbit).where(Acquisition.id.in_(list(groups))))}
        afters: dict[int, dict[int, _After]] = {q: {} for q in groups}
        for r in session.execute(_AFTERS, {"acqs": acqs, "areas": areas}):
            afters[r.acquisition_id][r.id] = _After(
                r.id, r.name, PairingPolicy(r.policy).value, tuple(r.questions or ()), float(r.min_clear_fraction),
                float(r.min_covered_fraction), r.scene_id, float(r.clear_fraction), tuple(sorted(r.tiles or ())))
        acqs = [q for q, by_area in afters.items() for _ in by_area]
        areas = [a for by_area in afters.values() for a in by_area]
        candidates: dict[tuple[int, int], list[_Candidate]] = {}
        for r in session.execute(_CANDIDATES, {
                "acqs": acqs, "areas": areas, "pacqs": list(info),
                "patterns": [f"{constellation(a.platform)}%" for a in info.values()], "limit": MAX_CANDIDATES}):
            candidates.setdefault((r.after_id, r.area_id), []).append(
                _Candidate(r.id, r.key, r.sensed_at, r.scene_id, float(r.clear_fraction), r.covered_fraction))
        analyses: list[dict[str, Any]] = []
        settled: dict[int, dict[int, str]] = {}
        no_before = 0  # counted into ``stats`` once committed (a failed batch is paired again one by one)
        for acquisition_id, by_area in afters.items():
            after = info[acquisition_id]
            settled[acquisition_id] = reasons = {}
            for area_id, area in by_area.items():
                before, reason = choose_before(area, after, candidates.get((acquisition_id, area_id), []))
                reasons[area_id] = reason
                if before is None:
                    no_before += 1
                    continue
                question_set = question_set_id(area.questions)
                analyses.append({
                    "idempotency_key": idempotency_key(area_id, after.key, before.key, analyser.id, question_set,
                                                       area.policy),
                    "area_id": area_id, "after_scene_id": area.scene_id, "before_scene_id": before.scene_id,
                    "question_set": question_set, "pairing_policy": area.policy, "pair_reason": reason,
                })
        created = jobs.create_pending_many(session, analyses, analyser=analyser)
        for acquisition_id, reasons in settled.items():
            observation_job.settle_clear(session, acquisition_id, reasons)
    paired = sum(len(reasons) for reasons in settled.values())
    stats.observations += paired
    stats.clear += paired
    stats.no_before += no_before
    stats.analyses_created += len(created)
    stats.analysis_ids.extend(created)


def pair_acquisition(settings: Settings, acquisition_id: int, area_ids: list[int], analyser: jobs.AnalyserSpec,
                     stats: PairingStats) -> None:
    """Settle the clear observations of one acquisition over ``area_ids``: before acquisition, analysis row."""
    pair_acquisitions(settings, {acquisition_id: area_ids}, analyser, stats)


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
