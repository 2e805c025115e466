"""Writing what a catalogue returned: catalogue rows, scenes (versioned upsert) and quarantined items.

Each item is a granule of an acquisition (:mod:`monitor.catalogues.identity`). The acquisition row is
upserted by key; the scene (granule) upsert is one parameterised ``INSERT … ON CONFLICT (granule_key) DO
UPDATE … WHERE excluded.version_rank > scenes.version_rank``: two pollers racing on the same granule,
twins (``_0_``/``_1_``), Earth Search v1/C1 twins or two catalogues' copies arriving in any order always
end with the best version — catalogue, assets and radiometry rule together — and never a duplicate.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from geoalchemy2.shape import from_shape
from sqlalchemy import func, literal_column
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from core.config import CatalogueSettings
from core.models import Acquisition, Catalogue, QuarantinedItem, Scene
from monitor.catalogues.items import MalformedItem, ParsedItem, parse_item

logger = logging.getLogger(__name__)


class UpsertOutcome(enum.StrEnum):
    INSERTED = "inserted"
    UPGRADED = "upgraded"  # a better version replaced the stored one
    UNCHANGED = "unchanged"  # same or lower-ranked version: nothing written


@dataclass
class IngestStats:
    items_seen: int = 0
    new_scenes: int = 0
    upgraded_scenes: int = 0
    unchanged: int = 0
    quarantined: int = 0
    late_items: int = 0  # new granules sensed more than the look-back before they were seen
    scene_ids: list[int] = field(default_factory=list)  # inserted or upgraded
    granule_keys: list[str] = field(default_factory=list)  # every item stored or already stored

    def add(self, other: IngestStats) -> None:
        self.items_seen += other.items_seen
        self.new_scenes += other.new_scenes
        self.upgraded_scenes += other.upgraded_scenes
        self.unchanged += other.unchanged
        self.quarantined += other.quarantined
        self.late_items += other.late_items
        self.scene_ids.extend(other.scene_ids)
        self.granule_keys.extend(other.granule_keys)


def upsert_catalogue(session: Session, catalogue: CatalogueSettings) -> int:
    """The ``catalogues`` row for a configured catalogue (by name; the URL follows the settings)."""
    stmt = (
        insert(Catalogue)
        .values(name=catalogue.name, url=catalogue.url)
        .on_conflict_do_update(index_elements=[Catalogue.name], set_={"url": catalogue.url})
        .returning(Catalogue.id)
    )
    return session.execute(stmt).scalar_one()


def upsert_acquisition(session: Session, parsed: ParsedItem) -> int:
    """The ``acquisitions`` row of the item's acquisition (created on first sight; the orbit filled in
    when a later granule knows it)."""
    stmt = insert(Acquisition).values(key=parsed.acquisition_key, platform=parsed.platform,
                                      sensed_at=parsed.datatake_at, relative_orbit=parsed.relative_orbit)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Acquisition.key],
        set_={"relative_orbit": func.coalesce(Acquisition.relative_orbit, stmt.excluded.relative_orbit)},
    ).returning(Acquisition.id)
    return session.execute(stmt).scalar_one()


def upsert_scene(session: Session, catalogue_id: int, collection: str, parsed: ParsedItem,
                 raw: dict[str, Any]) -> tuple[int | None, UpsertOutcome]:
    values = {
        "catalogue_id": catalogue_id,
        "collection": collection,
        "acquisition_id": upsert_acquisition(session, parsed),
        "acquisition_key": parsed.acquisition_key,
        "granule_key": parsed.granule_key,
        "profile": parsed.profile,
        "item_id": parsed.item_id,
        "version_rank": parsed.version_rank,
        "platform": parsed.platform,
        "tile": parsed.tile,
        "relative_orbit": parsed.relative_orbit,
        "acquired_at": parsed.acquired_at,
        "cloud_cover": parsed.cloud_cover,
        "processing_baseline": parsed.processing_baseline,
        "footprint": from_shape(parsed.footprint, srid=4326),
        "assets": parsed.assets,
        "item": raw,
        "versions_seen": 1,
    }
    stmt = insert(Scene).values(**values)
    excluded = stmt.excluded
    # A better version brings its own catalogue and collection: its hrefs are checked against that
    # catalogue's allow-list, and its assets carry their own radiometry rule.
    replace = ("catalogue_id", "collection", "item_id", "version_rank", "profile", "platform", "relative_orbit",
               "acquired_at", "cloud_cover", "processing_baseline", "footprint", "assets", "item")
    stmt = stmt.on_conflict_do_update(
        constraint="uq_scenes_granule",
        set_={
            **{name: excluded[name] for name in replace},
            "versions_seen": Scene.versions_seen + 1,
            "updated_at": literal_column("now()"),
        },
        # JSONB arrays of equal length compare element by element: [baseline, generated, sequence, preference].
        where=excluded.version_rank > Scene.version_rank,
    ).returning(Scene.id, literal_column("(xmax = 0)").label("inserted"))
    row = session.execute(stmt).one_or_none()
    if row is None:
        return None, UpsertOutcome.UNCHANGED
    return row.id, UpsertOutcome.INSERTED if row.inserted else UpsertOutcome.UPGRADED


def quarantine(session: Session, catalogue_id: int, collection: str | None, raw: Any, reason: str) -> None:
    item_id = raw.get("id") if isinstance(raw, dict) else None
    item_id = item_id if isinstance(item_id, str) else None
    # PostgreSQL text refuses NUL: an id/collection carrying one must not abort the batch (and every re-poll).
    item_id = _text_safe(item_id) if item_id is not None else None
    collection = _text_safe(collection) if collection is not None else None
    stored = raw if isinstance(raw, dict) and _jsonb_safe(raw) else None
    stmt = (
        insert(QuarantinedItem)
        .values(catalogue_id=catalogue_id, collection=collection, item_id=item_id, reason=reason[:2000], raw=stored)
        .on_conflict_do_nothing(constraint="uq_quarantine_item_reason")
    )
    session.execute(stmt)
    logger.warning("quarantined item %r of %s: %s", item_id, collection, reason)


def ingest_items(session: Session, catalogue: CatalogueSettings, catalogue_id: int, collection: str,
                 items: Iterable[Any], *, seen_at: datetime | None = None,
                 lookback: timedelta | None = None) -> IngestStats:
    """Upsert every item as a scene; quarantine the ones that cannot be (the rest still go in).

    Each item runs in a savepoint so one row the database rejects (say, a NUL byte in a string, which
    JSONB refuses) is quarantined instead of aborting the whole batch. With ``seen_at`` (the poll's now)
    and ``lookback``, a new granule sensed more than ``lookback`` before ``seen_at`` is late: logged at
    WARNING, counted in ``stats.late_items``, and stored like any other.
    """
    stats = IngestStats()
    for raw in items:
        stats.items_seen += 1
        item_collection = raw.get("collection") if isinstance(raw, dict) else None
        coll = item_collection if isinstance(item_collection, str) and item_collection else collection
        try:
            if not _jsonb_safe(raw):
                raise MalformedItem("item contains NUL characters or non-finite numbers (not storable as JSON)")
            parsed = parse_item(raw, catalogue)
        except MalformedItem as exc:
            quarantine(session, catalogue_id, coll, raw, str(exc))
            stats.quarantined += 1
            continue
        try:
            with session.begin_nested():
                scene_id, outcome = upsert_scene(session, catalogue_id, coll, parsed, raw)
        except (DataError, IntegrityError) as exc:
            quarantine(session, catalogue_id, coll, raw, f"database refused the item: {exc.orig}")
            stats.quarantined += 1
            continue
        stats.granule_keys.append(parsed.granule_key)
        if outcome is UpsertOutcome.INSERTED:
            stats.new_scenes += 1
            logger.info("new granule %s (%s)", parsed.item_id, parsed.granule_key)
            if seen_at is not None and lookback is not None and seen_at - parsed.acquired_at > lookback:
                stats.late_items += 1
                logger.warning("late item %s of %s: sensed %s, first seen %.1f days later, more than the %g-day "
                               "look-back; stored and analysed", parsed.item_id, coll,
                               parsed.acquired_at.isoformat(timespec="seconds"),
                               (seen_at - parsed.acquired_at).total_seconds() / 86400,
                               lookback.total_seconds() / 86400)
        elif outcome is UpsertOutcome.UPGRADED:
            stats.upgraded_scenes += 1
            logger.info("granule %s now carries better version %s (%s, rank %s)", parsed.granule_key,
                        parsed.item_id, parsed.profile, parsed.version_rank)
        else:
            stats.unchanged += 1
        if scene_id is not None:
            stats.scene_ids.append(scene_id)
    return stats


def _jsonb_safe(value: Any) -> bool:
    try:
        text = json.dumps(value, allow_nan=False)
        # JSON "\ud800" escapes decode to lone surrogates, which UTF-8 (so PostgreSQL) cannot carry.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError):  # UnicodeEncodeError is a ValueError
        return False
    return "\\u0000" not in text


def _text_safe(text: str) -> str:
    """``text`` without what PostgreSQL text refuses (NUL, lone surrogates), escaped instead."""
    return text.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")
