"""One poll of the configured catalogues: grouped searches, versioned scene upserts, a safe cursor.

For each configured catalogue × collection that some active area wants:

1. group the areas (``monitor.catalogues.groups``) — one search per group, not per area;
2. search ``datetime = (cursor or now) − look-back .. now`` (catalogues publish days late), loose cloud
   filter via STACQL ``query`` (the loosest of the group's areas), paging through every result; the
   searches of different groups run ``poll.search_threads`` at a time;
3. upsert each page's items as scenes (or quarantine them) and record which areas saw which scenes
   (pending observations, picked up by :mod:`monitor.pairing`) — one transaction per page;
4. only when every group's search completed, move the cursor to ``now``. On any failure the error is
   recorded in ``poll_states.last_error`` and the cursor stays, so the next poll re-reads the window:
   nothing is lost, and the upserts make the re-read harmless.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from geoalchemy2.shape import to_shape
from psycopg.errors import DeadlockDetected, SerializationFailure
from sqlalchemy import any_, func, literal, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core import observations as observation_job
from core.config import CatalogueSettings, Settings
from core.db import session_scope
from core.models import Area, AreaStatus, PollState, Scene
from monitor.catalogues.client import PolicyStacApiIO, open_client, search_pages
from monitor.catalogues.groups import AreaFootprint, SearchGroup, group_areas
from monitor.catalogues.store import IngestStats, ingest_items, upsert_catalogue

logger = logging.getLogger(__name__)

# A page's transaction aborted by PostgreSQL to break a lock cycle with a concurrent page is written again.
PAGE_ATTEMPTS = 3


@dataclass
class CollectionPoll:
    """What one catalogue × collection poll did."""

    catalogue: str
    collection: str
    areas: int = 0
    groups: int = 0
    window_start: datetime | None = None
    window_end: datetime | None = None
    http_requests: int = 0
    search_requests: int = 0
    stats: IngestStats = field(default_factory=IngestStats)
    observations_created: int = 0
    ok: bool = True
    error: str | None = None
    seconds: float = 0.0


@dataclass
class PollSummary:
    polls: list[CollectionPoll] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.polls)

    def total(self, name: str) -> int:
        return sum(getattr(p.stats, name) for p in self.polls)

    @property
    def search_requests(self) -> int:
        return sum(p.search_requests for p in self.polls)

    @property
    def http_requests(self) -> int:
        return sum(p.http_requests for p in self.polls)

    @property
    def observations_created(self) -> int:
        return sum(p.observations_created for p in self.polls)


class RequestCounter:
    """Counts HTTP responses of one client (requests' response hook; urllib3 retries are inside one)."""

    def __init__(self) -> None:
        self.total = 0
        self.searches = 0
        self._lock = threading.Lock()  # the searches of one poll run in several threads

    def __call__(self, response: Any, *args: Any, **kwargs: Any) -> None:
        search = response.request.path_url.split("?", 1)[0].rstrip("/").endswith("/search")
        with self._lock:
            self.total += 1
            self.searches += search


def poll_all(settings: Settings, *, now: datetime | None = None,
             catalogues: Iterable[str] | None = None) -> PollSummary:
    """Poll every configured catalogue (or the named ones) once. Never raises for a catalogue failure."""
    summary = PollSummary()
    deadline = time.monotonic() + settings.poll.deadline_seconds
    wanted = set(catalogues) if catalogues is not None else None
    for catalogue in settings.catalogues:
        if wanted is not None and catalogue.name not in wanted:
            continue
        try:
            summary.polls.extend(poll_catalogue(catalogue, settings, now=now, deadline=deadline))
        except Exception as exc:  # a database error outside a collection poll must not stop the others
            error = _describe(exc)
            logger.exception("poll of catalogue %s failed: %s", catalogue.name, error)
            summary.polls.extend(CollectionPoll(catalogue.name, collection, ok=False, error=error)
                                 for collection in catalogue.collections)
    return summary


def poll_catalogue(catalogue: CatalogueSettings, settings: Settings, *, now: datetime | None = None,
                   deadline: float | None = None) -> list[CollectionPoll]:
    """Poll one catalogue's collections; ``deadline`` (``time.monotonic()``) defaults to now + the setting."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    deadline = deadline if deadline is not None else time.monotonic() + settings.poll.deadline_seconds
    with session_scope(settings) as session:
        catalogue_id = upsert_catalogue(session, catalogue)
        work = {c: _active_areas(session, c) for c in catalogue.collections}
        cursors = {c: _cursor(session, catalogue_id, c) for c in catalogue.collections}
    work = {c: areas for c, areas in work.items() if areas}
    if not work:
        logger.info("catalogue %s: no active area wants %s; nothing to poll", catalogue.name, catalogue.collections)
        return []

    counter = RequestCounter()
    results: list[CollectionPoll] = []
    try:
        client = open_client(catalogue, settings.poll, response_hooks=[counter], deadline=deadline)
    except Exception as exc:  # any failure to reach the API is recorded, never fatal for the scheduler
        error = f"cannot open {catalogue.url}: {_describe(exc)}"
        logger.error("catalogue %s: %s", catalogue.name, error)
        for collection in work:
            _record_failure(settings, catalogue_id, collection, now, error)
            results.append(CollectionPoll(catalogue.name, collection, ok=False, error=error,
                                          http_requests=counter.total))
        return results

    for collection, areas in work.items():
        before_total, before_search = counter.total, counter.searches
        result = _poll_collection(client, catalogue, catalogue_id, collection, areas, cursors[collection],
                                  settings, now)
        result.http_requests = counter.total - before_total
        result.search_requests = counter.searches - before_search
        results.append(result)
    return results


def search_and_ingest(
    settings: Settings,
    client: Any,
    catalogue: CatalogueSettings,
    catalogue_id: int,
    collection: str,
    group: SearchGroup,
    start: datetime,
    end: datetime,
    page_size: int,
    stats: IngestStats,
    *,
    progress: Any = None,
    extra_query: dict[str, Any] | None = None,
    seen_at: datetime | None = None,
    lookback: timedelta | None = None,
    stac_io: PolicyStacApiIO | None = None,
) -> int:
    """Run one search and ingest it page by page (each page committed); return observations created.

    ``stats`` is updated after every committed page, so it is accurate even when a later page raises
    (API errors propagate to the caller, which keeps the cursor). ``extra_query``: more STACQL terms;
    ``seen_at``/``lookback``: count late granules (:func:`~monitor.catalogues.store.ingest_items`);
    ``stac_io``: a fork of the client's I/O, for a search run in another thread.
    """
    observations = 0
    pages = search_pages(client, collection=collection, intersects=group.geometry, start=start, end=end,
                         max_cloud_cover=group.max_cloud_cover, page_size=page_size, extra_query=extra_query,
                         stac_io=stac_io)
    for batch in pages:  # one transaction per page: what was read is kept even if a later page fails
        for attempt in range(1, PAGE_ATTEMPTS + 1):
            try:
                with session_scope(settings) as session:
                    batch_stats = ingest_items(session, catalogue, catalogue_id, collection, batch,
                                               seen_at=seen_at, lookback=lookback)
                    scene_ids = _scene_ids_for(session, catalogue_id, batch_stats)
                    created = create_observations(session, group.area_ids, scene_ids)
                break
            except OperationalError as exc:
                # Concurrent pages (other groups, another poller) write the same scenes and acquisitions;
                # PostgreSQL breaks a lock cycle by aborting one transaction, which is safe to run again.
                if attempt == PAGE_ATTEMPTS or not isinstance(exc.orig, DeadlockDetected | SerializationFailure):
                    raise
                logger.warning("page of %d items rolled back (%s); writing it again", len(batch),
                               exc.orig.__class__.__name__)
        stats.add(batch_stats)
        observations += created
        if progress is not None:
            progress.update(len(batch))
    return observations


def _poll_collection(client: Any, catalogue: CatalogueSettings, catalogue_id: int, collection: str,
                     areas: list[AreaFootprint], cursor: datetime | None, settings: Settings,
                     now: datetime) -> CollectionPoll:
    started = time.monotonic()
    lookback = timedelta(days=settings.poll.lookback_days)
    start = (min(cursor, now) if cursor else now) - lookback
    groups = group_areas(areas, settings.poll.group_distance_km)
    result = CollectionPoll(catalogue.name, collection, areas=len(areas), groups=len(groups),
                            window_start=start, window_end=now)
    logger.info("polling %s/%s: %d areas in %d searches, %s .. %s", catalogue.name, collection, len(areas),
                len(groups), start.isoformat(), now.isoformat())
    try:
        result.observations_created = _search_groups(
            settings, client, groups, settings.poll.search_threads, result.stats,
            lambda group, stats, stac_io: search_and_ingest(
                settings, client, catalogue, catalogue_id, collection, group, start, now, catalogue.page_size,
                stats, seen_at=now, lookback=lookback, stac_io=stac_io))
    except Exception as exc:  # API errors, timeouts, DB errors: record, keep the cursor, try next poll
        result.ok = False
        result.error = _describe(exc)
        logger.error("poll of %s/%s failed after %d items; cursor kept: %s", catalogue.name, collection,
                     result.stats.items_seen, result.error)
        _record_failure(settings, catalogue_id, collection, now, result.error, result.stats.items_seen,
                        result.stats.late_items)
    else:
        _record_success(settings, catalogue_id, collection, now, result.stats.items_seen, result.stats.late_items)
        logger.info("polled %s/%s: %d items, %d new scenes, %d upgraded, %d quarantined, %d new observations",
                    catalogue.name, collection, result.stats.items_seen, result.stats.new_scenes,
                    result.stats.upgraded_scenes, result.stats.quarantined, result.observations_created)
    result.seconds = time.monotonic() - started
    return result


def _search_groups(settings: Settings, client: Any, groups: list[SearchGroup], threads: int, stats: IngestStats,
                   search: Callable[[SearchGroup, IngestStats, PolicyStacApiIO], int]) -> int:
    """Run ``search(group, stats, stac_io)`` for every group, ``threads`` at a time; return the sum.

    Groups hold disjoint areas, so their pages never write the same observation. Each thread has its own
    HTTP session (a fork of the client's I/O: same policy, retries, deadline and request counting) and
    its own database connection. After the first failure no further search starts (the poll keeps its
    cursor either way, and the next one re-reads the window); the searches already running finish, and
    everything committed so far is counted in ``stats``. The first failure is raised.
    """
    ios: queue.SimpleQueue[PolicyStacApiIO] = queue.SimpleQueue()
    ios.put(client._stac_io)
    for _ in range(min(threads, len(groups)) - 1):
        ios.put(client._stac_io.fork())
    per_group = [IngestStats() for _ in groups]
    failures: list[BaseException] = []
    lock = threading.Lock()

    def run(index: int) -> int:
        if failures:
            return 0
        stac_io = ios.get()
        try:
            return search(groups[index], per_group[index], stac_io)
        except Exception as exc:
            with lock:
                failures.append(exc)
            return 0
        finally:
            ios.put(stac_io)

    if threads <= 1 or len(groups) <= 1:
        created = sum(run(i) for i in range(len(groups)))
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="poll-search") as pool:
            created = sum(pool.map(run, range(len(groups))))
    for group_stats in per_group:
        stats.add(group_stats)
    if failures:
        raise failures[0]
    return created


# --- areas, observations ---------------------------------------------------------------------------


def _active_areas(session: Session, collection: str, area_ids: list[int] | None = None) -> list[AreaFootprint]:
    query = select(Area.id, Area.geom, Area.max_cloud_cover).where(
        Area.status == AreaStatus.ACTIVE, literal(collection) == any_(Area.collections)
    ).order_by(Area.id)
    if area_ids is not None:
        query = query.where(Area.id.in_(area_ids))
    return [AreaFootprint(row.id, to_shape(row.geom), float(row.max_cloud_cover)) for row in session.execute(query)]


def create_observations(session: Session, area_ids: list[int], scene_ids: list[int]) -> int:
    """Pending observations for every (active area, acquisition) with a granule among ``scene_ids`` whose
    footprint intersects the area (PostGIS decides); one row per acquisition however many tiles touch it.

    A scene returned by a search made for a group is offered to that group's areas only (the group was
    formed from the areas that want the searched collection); the footprint test here is exact, the
    search geometry was only a superset. The scene's own collection is not compared: the stored best
    version of a granule may come from another collection (Earth Search C1 for a v1 search). A ``partial``
    observation is computed again when a granule of its acquisition arrives after it was computed
    (:func:`core.observations.reopen_late_partial`).
    """
    if not area_ids or not scene_ids:
        return 0
    from core.models import Observation, ObservationStatus

    pending = literal(ObservationStatus.PENDING, type_=Observation.__table__.c.status.type)
    touching = (
        Area.id.in_(area_ids), Scene.id.in_(scene_ids), Area.status == AreaStatus.ACTIVE,
    )
    pairs = (
        select(Area.id, Scene.acquisition_id, func.min(Scene.id), pending)
        .join(Scene, func.ST_Intersects(Area.geom, Scene.footprint))
        .where(*touching)
        .group_by(Area.id, Scene.acquisition_id)
    )
    stmt = (
        insert(Observation)
        .from_select(["area_id", "acquisition_id", "scene_id", "status"], pairs)
        .on_conflict_do_nothing(index_elements=["area_id", "acquisition_id"])
        .returning(Observation.area_id)
    )
    created = len(session.execute(stmt).all())
    observation_job.reopen_late_partial(session, list(area_ids), list(scene_ids))
    return created


def _scene_ids_for(session: Session, catalogue_id: int, stats: IngestStats) -> list[int]:
    """Ids of every scene the batch touched, including unchanged ones (a new area needs those too)."""
    if not stats.granule_keys:
        return []
    # By granule key alone: the stored best version of a granule may have come from another catalogue.
    rows = session.execute(select(Scene.id).where(Scene.granule_key.in_(stats.granule_keys))).scalars()
    return sorted(set(rows))


# --- poll state ------------------------------------------------------------------------------------


def _cursor(session: Session, catalogue_id: int, collection: str) -> datetime | None:
    return session.execute(
        select(PollState.cursor).where(PollState.catalogue_id == catalogue_id, PollState.collection == collection)
    ).scalar_one_or_none()


def _record_success(settings: Settings, catalogue_id: int, collection: str, now: datetime, items_seen: int,
                    late_items: int = 0) -> None:
    with session_scope(settings) as session:
        stmt = insert(PollState).values(
            catalogue_id=catalogue_id, collection=collection, cursor=now, last_attempt_at=func.now(),
            last_success_at=func.now(), last_error=None, items_seen=items_seen, late_items=late_items,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[PollState.catalogue_id, PollState.collection],
            set_={
                # never move the cursor backwards (a replayed/backdated poll must not re-open old windows
                # forever, nor skip: the window start is always cursor - look-back)
                "cursor": func.greatest(PollState.cursor, stmt.excluded.cursor),
                "last_attempt_at": stmt.excluded.last_attempt_at,
                "last_success_at": stmt.excluded.last_success_at,
                "last_error": None,
                "items_seen": PollState.items_seen + stmt.excluded.items_seen,
                "late_items": PollState.late_items + stmt.excluded.late_items,
            },
        )
        session.execute(stmt)


def _record_failure(settings: Settings, catalogue_id: int, collection: str, now: datetime, error: str,
                    items_seen: int = 0, late_items: int = 0) -> None:
    with session_scope(settings) as session:
        stmt = insert(PollState).values(
            catalogue_id=catalogue_id, collection=collection, cursor=None, last_attempt_at=func.now(),
            last_error=error[:4000], items_seen=items_seen, late_items=late_items,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[PollState.catalogue_id, PollState.collection],
            set_={
                "last_attempt_at": stmt.excluded.last_attempt_at,
                "last_error": stmt.excluded.last_error,
                "items_seen": PollState.items_seen + stmt.excluded.items_seen,
                "late_items": PollState.late_items + stmt.excluded.late_items,
            },
        )
        session.execute(stmt)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text[:1000]}"
