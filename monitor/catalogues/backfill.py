"""Historical run for one area: search its own footprint since a date, ingest, pair.

Unlike the regular poll this neither groups areas nor touches the poll cursor: it is a one-off read of
the archive (users adding an area want to see what already changed, design notes §2 #9). Scenes and
analyses are upserted with the same keys as the poll, so running it twice, or alongside the scheduler,
duplicates nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from geoalchemy2.shape import to_shape

from core.config import Settings
from core.db import session_scope
from monitor.areas import get_area
from monitor.catalogues.client import make_search, open_client
from monitor.catalogues.groups import SearchGroup, search_geometry
from monitor.catalogues.poller import search_and_ingest
from monitor.catalogues.store import IngestStats, upsert_catalogue
from monitor.locks import PAIR_LOCK, cycle_lock
from monitor.pairing import PairingStats, process_pending

logger = logging.getLogger(__name__)

# A progress bar factory: (description, total or None) -> object with update(n), reset(total=), close().
ProgressFactory = Callable[[str, int | None], Any]


@dataclass
class BackfillSummary:
    area: str
    ingest: IngestStats = field(default_factory=IngestStats)
    observations_created: int = 0
    pairing: PairingStats = field(default_factory=PairingStats)
    errors: list[str] = field(default_factory=list)


def backfill_area(area_ref: str, since: datetime, until: datetime | None = None, *, settings: Settings,
                  progress: ProgressFactory | None = None) -> BackfillSummary:
    until = (until or datetime.now(UTC)).astimezone(UTC)
    since = since.astimezone(UTC) if since.tzinfo else since.replace(tzinfo=UTC)
    with session_scope(settings) as session:
        area = get_area(session, area_ref)
        name, area_id = area.name, area.id
        geom, max_cloud = to_shape(area.geom), float(area.max_cloud_cover)
        collections = list(area.collections or [])
    summary = BackfillSummary(area=name)
    group = SearchGroup(area_ids=[area_id], geometry=search_geometry([geom]), max_cloud_cover=max_cloud)
    logger.info("backfill of area %r from %s to %s", name, since.isoformat(), until.isoformat())

    for catalogue in settings.catalogues:
        wanted = [c for c in catalogue.collections if c in collections]
        if not wanted:
            continue
        with session_scope(settings) as session:
            catalogue_id = upsert_catalogue(session, catalogue)
        try:
            client = open_client(catalogue, settings.poll)
        except Exception as exc:
            summary.errors.append(f"{catalogue.name}: cannot open {catalogue.url}: {exc}")
            continue
        for collection in wanted:
            search_args = dict(collection=collection, intersects=group.geometry, start=since, end=until,
                               max_cloud_cover=group.max_cloud_cover, page_size=catalogue.page_size)
            bar = None
            try:
                total = make_search(client, **search_args).matched() if progress else None
                bar = progress(f"{catalogue.name}/{collection}", total) if progress else None
                summary.observations_created += search_and_ingest(
                    settings, client, catalogue, catalogue_id, collection, group, since, until, catalogue.page_size,
                    summary.ingest, progress=bar)
            except Exception as exc:  # report and go on with the other collections
                summary.errors.append(f"{catalogue.name}/{collection}: {exc.__class__.__name__}: {exc}")
                logger.error("backfill of %r from %s/%s failed: %s", name, catalogue.name, collection, exc)
                continue
            finally:
                if bar is not None:
                    bar.close()

    bar = progress("pairing", None) if progress else None
    try:
        with cycle_lock(settings.database_url, PAIR_LOCK):
            summary.pairing = process_pending(settings, area_ids=[area_id], progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return summary
