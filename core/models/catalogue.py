"""What the polls store: catalogues, poll cursors, acquisitions, their granules (scenes), quarantined items."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from geoalchemy2 import Geometry, WKBElement
from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import (
    Base,
    _now,
)


class Catalogue(Base):
    """A configured STAC API (mirrors the settings; rows are upserted by name at poll time)."""

    __tablename__ = "catalogues"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    url: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class PollState(Base):
    """Cursor per (catalogue, collection). Advanced only after a whole search succeeded."""

    __tablename__ = "poll_states"

    catalogue_id: Mapped[int] = mapped_column(ForeignKey("catalogues.id", ondelete="CASCADE"), primary_key=True)
    collection: Mapped[str] = mapped_column(Text, primary_key=True)
    cursor: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_success_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    items_seen: Mapped[int] = mapped_column(BigInteger, default=0)
    # The late sweep (monitor/catalogues/late.py): publication time read up to, last completed sweep, how it
    # searched (updated / created / deep), and late granules stored (unirs_late_items_total).
    late_cursor: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    late_swept_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    late_mode: Mapped[str | None] = mapped_column(Text)
    late_items: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class Acquisition(Base):
    """One imaging event: a Sentinel-2 datatake (platform + sensing start) or a Landsat scene (platform +
    path/row + date), whatever catalogue, collection or reprocessing reports it. Its granules are scenes."""

    __tablename__ = "acquisitions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    key: Mapped[str] = mapped_column(Text, unique=True)  # sentinel-2b|2025-07-31T13:02:49Z
    platform: Mapped[str | None] = mapped_column(Text)
    sensed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # datatake start (Landsat: scene time)
    relative_orbit: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class Scene(Base):
    """One granule (tile) of an acquisition, deduplicated across catalogues and collections: reprocessed
    versions, `_0_`/`_1_` twins, Earth Search v1/C1 twins and another catalogue's copy collapse to one row,
    which holds the best-ranked version (its catalogue, assets and radiometry rule travel together)."""

    __tablename__ = "scenes"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    catalogue_id: Mapped[int] = mapped_column(ForeignKey("catalogues.id", ondelete="RESTRICT"))
    collection: Mapped[str] = mapped_column(Text)
    acquisition_id: Mapped[int] = mapped_column(ForeignKey("acquisitions.id", ondelete="RESTRICT"))
    acquisition_key: Mapped[str] = mapped_column(Text)  # the acquisition's key (denormalised)
    granule_key: Mapped[str] = mapped_column(Text)  # acquisition key|tile
    item_id: Mapped[str] = mapped_column(Text)  # id of the best version seen
    version_rank: Mapped[list[Any]] = mapped_column(JSONB)  # sortable [baseline, generated, sequence, preference]
    profile: Mapped[str | None] = mapped_column(Text)  # eo.profiles name of the best version
    platform: Mapped[str | None] = mapped_column(Text)
    tile: Mapped[str | None] = mapped_column(Text)
    relative_orbit: Mapped[int | None] = mapped_column(Integer)
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    cloud_cover: Mapped[float | None] = mapped_column(Float)
    processing_baseline: Mapped[str | None] = mapped_column(Text)
    footprint: Mapped[WKBElement] = mapped_column(Geometry("GEOMETRY", srid=4326, spatial_index=False))
    assets: Mapped[dict[str, Any]] = mapped_column(JSONB)  # logical band -> {href, scale, offset, ...}
    item: Mapped[dict[str, Any]] = mapped_column(JSONB)  # the raw STAC item of the best version
    versions_seen: Mapped[int] = mapped_column(Integer, default=1)
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now(), onupdate=_now())

    __table_args__ = (
        UniqueConstraint("granule_key", name="uq_scenes_granule"),
        Index("ix_scenes_footprint", "footprint", postgresql_using="gist"),
        Index("ix_scenes_tile_acquired", "tile", "acquired_at"),
        Index("ix_scenes_acquired_at", "acquired_at"),
        Index("ix_scenes_acquisition", "acquisition_id"),
    )


class QuarantinedItem(Base):
    """A STAC item that could not be ingested, kept with the reason so nothing is silently dropped."""

    __tablename__ = "quarantined_items"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    catalogue_id: Mapped[int] = mapped_column(ForeignKey("catalogues.id", ondelete="CASCADE"))
    collection: Mapped[str | None] = mapped_column(Text)
    item_id: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    raw: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    # NULLS NOT DISTINCT: an item without an id is quarantined once, not again on every poll.
    __table_args__ = (
        UniqueConstraint(
            "catalogue_id", "item_id", "reason", name="uq_quarantine_item_reason", postgresql_nulls_not_distinct=True
        ),
    )
