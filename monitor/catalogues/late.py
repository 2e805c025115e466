"""The late sweep: items published more than the look-back after they were sensed are still found.

The regular poll reads sensing times ``cursor − look-back .. now``; an item a provider publishes later
than that (outages, backfills) lies before every later window and would be lost without a word. A second,
slower sweep (at most every ``poll.late_sweep_hours``, after a poll) looks for such items, for sensing
times ``now − poll.late_sweep_days .. now − look-back``, in one of two ways per catalogue × collection:

- ``updated`` / ``created``: where the API filters on that publication-time property — probed, not
  assumed: ``{"updated": {"gt": 9999-12-31}}`` must match nothing and ``{"updated": {"lte": 9999-12-31}}``
  something (a server that ignores an unknown ``query`` term fails the first) — only items published
  since the last sweep (``late_cursor`` less :data:`OVERLAP`) are asked for;
- ``deep``: otherwise, everything in that sensing range is re-read (upserts make re-reading harmless),
  but for each group of areas no further back than its oldest area's creation − look-back: what was
  sensed before an area existed is its history (``backfill``), not a late publication.

Either way the items go through the same ingest as the poll: a new granule sensed more than the
look-back before it was seen is logged at WARNING, counted in ``poll_states.late_items`` (the
``unirs_late_items_total`` metric), stored, and paired/analysed like any other. The sweep's state
(``late_cursor``, ``late_swept_at``, ``late_mode``) moves only when the whole sweep succeeded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from core.config import CatalogueSettings, Settings
from core.db import session_scope
from core.models import Area, PollState
from monitor.catalogues.client import first_page_size, open_client
from monitor.catalogues.groups import group_areas
from monitor.catalogues.poller import RequestCounter, _active_areas, _describe, search_and_ingest
from monitor.catalogues.store import IngestStats, upsert_catalogue

logger = logging.getLogger(__name__)

# Publication times are the provider's clock and become visible only when its indexing commits: each
# sweep re-reads a day before its cursor.
OVERLAP = timedelta(days=1)
PUBLICATION_FIELDS = ("updated", "created")
_FAR_FUTURE = "9999-12-31T23:59:59Z"


@dataclass
class SweepResult:
    """What one late sweep of a catalogue × collection did."""

    catalogue: str
    collection: str
    mode: str = "deep"  # updated / created (publication-time filter) or deep
    sensed_start: datetime | None = None
    sensed_end: datetime | None = None
    published_since: datetime | None = None
    searches: int = 0
    search_requests: int = 0
    http_requests: int = 0
    stats: IngestStats = field(default_factory=IngestStats)
    observations_created: int = 0
    ok: bool = True
    error: str | None = None
    seconds: float = 0.0


def sweep_late_all(settings: Settings, *, now: datetime | None = None, force: bool = False) -> list[SweepResult]:
    """Sweep every catalogue × collection that is due (``force``: due or not). Never raises for a catalogue."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    results: list[SweepResult] = []
    if settings.poll.late_sweep_hours <= 0 and not force:
        return results
    deadline = time.monotonic() + settings.poll.deadline_seconds
    for catalogue in settings.catalogues:
        if catalogue.late_sweep == "off":
            continue
        try:
            results.extend(sweep_catalogue(catalogue, settings, now=now, deadline=deadline, force=force))
        except Exception as exc:  # a database error must not stop the other catalogues
            logger.exception("late sweep of catalogue %s failed: %s", catalogue.name, _describe(exc))
            results.append(SweepResult(catalogue.name, "*", ok=False, error=_describe(exc)))
    return results


def sweep_catalogue(catalogue: CatalogueSettings, settings: Settings, *, now: datetime, deadline: float,
                    force: bool = False) -> list[SweepResult]:
    lookback = timedelta(days=settings.poll.lookback_days)
    sensed_start, sensed_end = now - timedelta(days=settings.poll.late_sweep_days), now - lookback
    if sensed_start >= sensed_end:
        return []  # the regular window already reaches as far back as the sweep would
    every = timedelta(hours=settings.poll.late_sweep_hours)
    with session_scope(settings) as session:
        catalogue_id = upsert_catalogue(session, catalogue)
        states = {c: session.get(PollState, (catalogue_id, c)) for c in catalogue.collections}
        due = {c: (state.late_cursor if state else None) for c, state in states.items()
               if force or state is None or state.late_swept_at is None or now - state.late_swept_at >= every}
        work = {c: _active_areas(session, c) for c in due}
        created = {c: _created(session, [a.area_id for a in areas]) for c, areas in work.items()}
    work = {c: areas for c, areas in work.items() if areas}
    if not work:
        return []
    counter = RequestCounter()
    client = open_client(catalogue, settings.poll, response_hooks=[counter], deadline=deadline)
    results = []
    for collection, areas in work.items():
        started, before_total, before_search = time.monotonic(), counter.total, counter.searches
        result = SweepResult(catalogue.name, collection, sensed_start=sensed_start, sensed_end=sensed_end)
        try:
            result.mode = _mode(client, catalogue, collection)
            extra_query = None
            if result.mode != "deep":
                result.published_since = (due[collection] or now - lookback) - OVERLAP
                extra_query = {result.mode: {"gte": result.published_since.strftime("%Y-%m-%dT%H:%M:%SZ")}}
            for group in group_areas(areas, settings.poll.group_distance_km):
                start = sensed_start
                if result.mode == "deep":
                    start = max(start, min(created[collection][a] for a in group.area_ids) - lookback)
                if start >= sensed_end:
                    continue
                result.searches += 1
                result.observations_created += search_and_ingest(
                    settings, client, catalogue, catalogue_id, collection, group, start, sensed_end,
                    catalogue.page_size, result.stats, extra_query=extra_query, seen_at=now, lookback=lookback)
        except Exception as exc:  # API errors, timeouts: the sweep state stays, the next sweep re-reads
            result.ok, result.error = False, _describe(exc)
            logger.error("late sweep of %s/%s (%s) failed: %s", catalogue.name, collection, result.mode, result.error)
        _record(settings, catalogue_id, collection, now, result)
        result.http_requests = counter.total - before_total
        result.search_requests = counter.searches - before_search
        result.seconds = time.monotonic() - started
        logger.info("late sweep of %s/%s (%s, sensed %s .. %s%s): %d items, %d new granules, %d late", catalogue.name,
                    collection, result.mode, sensed_start.date(), sensed_end.date(),
                    f", published since {result.published_since.isoformat()}" if result.published_since else "",
                    result.stats.items_seen, result.stats.new_scenes, result.stats.late_items)
        results.append(result)
    return results


def publication_field(client: Any, collection: str) -> str | None:
    """The first of :data:`PUBLICATION_FIELDS` the API really filters ``collection`` on, else None (4 requests
    at most). An empty collection gives None: nothing to tell a filter from no items."""
    for name in PUBLICATION_FIELDS:
        if (first_page_size(client, collection, {name: {"gt": _FAR_FUTURE}}) == 0
                and first_page_size(client, collection, {name: {"lte": _FAR_FUTURE}}) > 0):
            return name
    return None


def _mode(client: Any, catalogue: CatalogueSettings, collection: str) -> str:
    if catalogue.late_sweep != "auto":
        return catalogue.late_sweep
    return publication_field(client, collection) or "deep"


def _created(session: Any, area_ids: list[int]) -> dict[int, datetime]:
    if not area_ids:
        return {}
    return dict(session.execute(select(Area.id, Area.created_at).where(Area.id.in_(area_ids))).all())


def _record(settings: Settings, catalogue_id: int, collection: str, now: datetime, result: SweepResult) -> None:
    """Add the late items found (even by a failed sweep: they are stored); move the sweep state on success."""
    values: dict[str, Any] = {"late_items": result.stats.late_items}
    if result.ok:
        values.update(late_cursor=now, late_swept_at=now, late_mode=result.mode)
    with session_scope(settings) as session:
        stmt = insert(PollState).values(catalogue_id=catalogue_id, collection=collection, items_seen=0, **values)
        updates: dict[str, Any] = {"late_items": PollState.late_items + stmt.excluded.late_items}
        if result.ok:
            updates.update(late_cursor=func.greatest(PollState.late_cursor, stmt.excluded.late_cursor),
                           late_swept_at=stmt.excluded.late_swept_at, late_mode=stmt.excluded.late_mode)
        session.execute(stmt.on_conflict_do_update(index_elements=[PollState.catalogue_id, PollState.collection],
                                                   set_=updates))
