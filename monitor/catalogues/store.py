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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from geoalchemy2.shape import from_shape
from sqlalchemy import literal_column, select, update
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


def upsert_acquisitions(session: Session, items: Sequence[ParsedItem]) -> dict[str, int]:
    """Acquisition key -> ``acquisitions.id`` for every item's acquisition: created on first sight (the
    first item's platform and datatake time), the relative orbit filled in when a later granule knows it.

    Rows already stored (and complete) are only read: an upsert would lock each one until the page's
    transaction commits, and concurrent searches of other groups share acquisitions (one datatake crosses
    many tiles). New keys are inserted in key order, so two concurrent pages cannot wait on each other.
    """
    first: dict[str, ParsedItem] = {}
    orbit: dict[str, int] = {}
    for parsed in items:
        first.setdefault(parsed.acquisition_key, parsed)
        if parsed.relative_orbit is not None:
            orbit.setdefault(parsed.acquisition_key, parsed.relative_orbit)
    if not first:
        return {}
    ids: dict[str, int] = {}
    incomplete: list[str] = []

    def read(keys: list[str]) -> None:
        rows = session.execute(select(Acquisition.key, Acquisition.id, Acquisition.relative_orbit)
                               .where(Acquisition.key.in_(keys))).all()
        for row in rows:
            ids[row.key] = row.id
            if row.relative_orbit is None and row.key in orbit:
                incomplete.append(row.key)

    read(sorted(first))
    missing = sorted(k for k in first if k not in ids)
    for chunk in _chunks(missing):
        stmt = (
            insert(Acquisition)
            .values([{"key": k, "platform": first[k].platform, "sensed_at": first[k].datatake_at,
                      "relative_orbit": orbit.get(k)} for k in chunk])
            .on_conflict_do_nothing(index_elements=[Acquisition.key])
            .returning(Acquisition.key, Acquisition.id)
        )
        ids.update(session.execute(stmt).all())
    raced = [k for k in missing if k not in ids]  # inserted by a concurrent transaction meanwhile
    if raced:
        read(raced)
    for key in sorted(set(incomplete)):
        session.execute(update(Acquisition).where(Acquisition.key == key, Acquisition.relative_orbit.is_(None))
                        .values(relative_orbit=orbit[key]))
    return ids


def upsert_acquisition(session: Session, parsed: ParsedItem) -> int:
    """The ``acquisitions`` row of the item's acquisition (see :func:`upsert_acquisitions`)."""
    return upsert_acquisitions(session, [parsed])[parsed.acquisition_key]


def upsert_scenes(session: Session, catalogue_id: int,
                  entries: Sequence[tuple[str, ParsedItem, dict[str, Any]]]) -> list[tuple[int | None, UpsertOutcome]]:
    """Upsert ``(collection, parsed, raw item)`` entries as scenes: (scene id or None, outcome) per entry.

    No granule key may appear twice (``ValueError``; :func:`ingest_items` splits a page into rounds).
    One multi-row ``INSERT … ON CONFLICT DO UPDATE … WHERE excluded.version_rank > scenes.version_rank``
    per :data:`CHUNK` rows, in granule-key order (concurrent pages lock rows in the same order). A
    granule already stored with an equal or better rank is UNCHANGED without being written: the upsert
    would lock its row until commit, and re-polled items are most of what a poll reads. Raises
    ``DataError`` / ``IntegrityError`` for a row the database refuses (the caller retries item by item).
    """
    keys = [parsed.granule_key for _, parsed, _ in entries]
    if len(set(keys)) != len(keys):
        raise ValueError("upsert_scenes: a granule key appears twice in one batch")
    if not entries:
        return []
    acquisitions = upsert_acquisitions(session, [parsed for _, parsed, _ in entries])
    stored = dict(session.execute(select(Scene.granule_key, Scene.version_rank)
                                  .where(Scene.granule_key.in_(sorted(keys)))).all())
    rows = [_scene_row(catalogue_id, collection, parsed, raw, acquisitions[parsed.acquisition_key])
            for collection, parsed, raw in entries
            if not _outranked(parsed.version_rank, stored.get(parsed.granule_key))]
    rows.sort(key=lambda row: row["granule_key"])
    written: dict[str, tuple[int, UpsertOutcome]] = {}
    for chunk in _chunks(rows):
        stmt = insert(Scene).values(chunk)
        excluded = stmt.excluded
        stmt = stmt.on_conflict_do_update(
            constraint="uq_scenes_granule",
            set_={
                **{name: excluded[name] for name in _REPLACED},
                "versions_seen": Scene.versions_seen + 1,
                "updated_at": literal_column("now()"),
            },
            # JSONB arrays of equal length compare element by element: [baseline, generated, sequence, preference].
            where=excluded.version_rank > Scene.version_rank,
        ).returning(Scene.granule_key, Scene.id, literal_column("(xmax = 0)").label("inserted"))
        for row in session.execute(stmt):
            written[row.granule_key] = (row.id, UpsertOutcome.INSERTED if row.inserted else UpsertOutcome.UPGRADED)
    return [written.get(key, (None, UpsertOutcome.UNCHANGED)) for key in keys]


def upsert_scene(session: Session, catalogue_id: int, collection: str, parsed: ParsedItem,
                 raw: dict[str, Any]) -> tuple[int | None, UpsertOutcome]:
    """One item as a scene (see :func:`upsert_scenes`)."""
    return upsert_scenes(session, catalogue_id, [(collection, parsed, raw)])[0]


# A better version brings its own catalogue and collection: its hrefs are checked against that
# catalogue's allow-list, and its assets carry their own radiometry rule.
_REPLACED = ("catalogue_id", "collection", "item_id", "version_rank", "profile", "platform", "relative_orbit",
             "acquired_at", "cloud_cover", "processing_baseline", "footprint", "assets", "item")
# Rows per multi-row INSERT: ~20 parameters a row stays far below PostgreSQL's 65,535 per statement.
CHUNK = 250


def _scene_row(catalogue_id: int, collection: str, parsed: ParsedItem, raw: dict[str, Any],
               acquisition_id: int) -> dict[str, Any]:
    return {
        "catalogue_id": catalogue_id,
        "collection": collection,
        "acquisition_id": acquisition_id,
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


def _outranked(rank: list[float], stored: Any) -> bool:
    """Whether the stored rank is equal or better, decided as PostgreSQL would (JSONB arrays of numbers of
    equal length compare element by element); anything else is left to the upsert's own comparison."""
    def numbers(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)

    return numbers(stored) and numbers(rank) and len(stored) == len(rank) and stored >= rank


def _chunks(rows: Sequence[Any], size: int | None = None) -> Iterator[Sequence[Any]]:
    size = size or CHUNK
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


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

    Items are parsed one by one, then written together (:func:`upsert_scenes`: a few statements per page
    instead of several per item). A page holding one granule twice (``_0_``/``_1_`` twins) is written in
    rounds, in the page's order, so the outcome is the one item-by-item upserts would have. When the
    database refuses a batch (say, a NUL byte in a string, which JSONB refuses) it is rolled back to its
    savepoint and written item by item, each in its own savepoint: only the refused item is quarantined.
    With ``seen_at`` (the poll's now) and ``lookback``, a new granule sensed more than ``lookback`` before
    ``seen_at`` is late: logged at WARNING, counted in ``stats.late_items``, and stored like any other.
    """
    stats = IngestStats()
    accepted: list[tuple[str, ParsedItem, Any]] = []
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
        accepted.append((coll, parsed, raw))
    for batch in _rounds(accepted):
        for (coll, parsed, _raw), (scene_id, outcome) in zip(batch, _write(session, catalogue_id, batch),
                                                             strict=True):
            if outcome is None:
                stats.quarantined += 1
                continue
            _count(stats, coll, parsed, scene_id, outcome, seen_at, lookback)
    return stats


def _rounds(entries: list[tuple[str, ParsedItem, Any]]) -> list[list[tuple[str, ParsedItem, Any]]]:
    """Split entries so that no granule key repeats within a round; round k holds each key's k-th entry."""
    seen: dict[str, int] = {}
    rounds: list[list[tuple[str, ParsedItem, Any]]] = []
    for entry in entries:
        n = seen.get(entry[1].granule_key, 0)
        seen[entry[1].granule_key] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(entry)
    return rounds


def _write(session: Session, catalogue_id: int,
           batch: list[tuple[str, ParsedItem, Any]]) -> list[tuple[int | None, UpsertOutcome | None]]:
    """Outcomes of one round (None: the database refused the item, now quarantined)."""
    try:
        with session.begin_nested():
            return list(upsert_scenes(session, catalogue_id, batch))
    except (DataError, IntegrityError):
        if len(batch) == 1:
            return [_write_one(session, catalogue_id, batch[0])]
    return [_write_one(session, catalogue_id, entry) for entry in batch]


def _write_one(session: Session, catalogue_id: int,
               entry: tuple[str, ParsedItem, Any]) -> tuple[int | None, UpsertOutcome | None]:
    coll, _parsed, raw = entry
    try:
        with session.begin_nested():
            return upsert_scenes(session, catalogue_id, [entry])[0]
    except (DataError, IntegrityError) as exc:
        quarantine(session, catalogue_id, coll, raw, f"database refused the item: {exc.orig}")
        return None, None


def _count(stats: IngestStats, coll: str, parsed: ParsedItem, scene_id: int | None, outcome: UpsertOutcome,
           seen_at: datetime | None, lookback: timedelta | None) -> None:
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
