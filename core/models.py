"""SQLAlchemy models: the whole state of the service lives in these tables.

Work items (:class:`Analysis`, :class:`Delivery`) carry explicit statuses; queues only carry their ids.
Every write that could be repeated is guarded by a UNIQUE key (scene acquisition key, analysis
idempotency key, delivery key + recipient), so retries and duplicate messages are harmless.

The first Alembic revision (``migrations/versions/0001_initial.py``) creates exactly these tables; any
change here needs a matching revision.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from geoalchemy2 import Geometry, WKBElement
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, values_callable=lambda e: [m.value for m in e], validate_strings=True)


class AreaStatus(enum.StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"


class AlertFrequency(enum.StrEnum):
    IMMEDIATE = "immediate"
    DAILY = "daily"
    OFF = "off"


class PairingPolicy(enum.StrEnum):
    LATEST = "latest"
    SEASONAL = "seasonal"


class ObservationStatus(enum.StrEnum):
    """Outcome of looking at one acquisition over one area (covered and clear fractions)."""

    PENDING = "pending"
    CLEAR = "clear"
    CLOUDY = "cloudy"
    PARTIAL = "partial"  # imaged too little of the area (tile edge, datastrip end): not cloud
    FAILED = "failed"


class AnalysisStatus(enum.StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"  # never sent, on purpose: ``skip_reason`` says why (e.g. "unsubscribed")


DEFAULT_ALERT_CLASSES = ("new_built_up_or_bare", "vegetation_loss")


def _now() -> Any:
    return func.now()


OPERATOR_EMAIL = "operator@localhost"


class User(Base):
    """An account of the web app / API. ``is_admin`` sees and changes every area; others only their own."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(Text, unique=True)  # stored lower-case
    name: Mapped[str | None] = mapped_column(Text)
    password_hash: Mapped[str | None] = mapped_column(Text)  # argon2 (pwdlib); None = no browser login
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class Area(Base):
    """A watched area: a polygon plus what to look for and whom to tell."""

    __tablename__ = "areas"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Who sees and changes it (web API, revision 0006). Unset = the operator account the migration creates,
    # so the CLI and the scheduler need not know about accounts.
    owner_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="RESTRICT"), index=True,
        default=select(User.id).where(User.email == OPERATOR_EMAIL).scalar_subquery(),
    )
    geom: Mapped[WKBElement] = mapped_column(Geometry("MULTIPOLYGON", srid=4326, spatial_index=False))
    area_km2: Mapped[float] = mapped_column(Float)
    status: Mapped[AreaStatus] = mapped_column(_enum(AreaStatus, "area_status"), default=AreaStatus.ACTIVE)
    collections: Mapped[list[str]] = mapped_column(ARRAY(Text), default=lambda: ["sentinel-2-l2a"])
    # Scene-level cloud filter sent to the catalogue (loose: the AOI clear fraction decides later).
    max_cloud_cover: Mapped[float] = mapped_column(Float, default=80.0)
    min_clear_fraction: Mapped[float] = mapped_column(Float, default=0.7)  # of the imaged pixels
    # An acquisition imaging less of the area than this is "partial", never "cloudy" (revision 0008).
    min_covered_fraction: Mapped[float] = mapped_column(Float, default=0.5, server_default=text("0.5"))
    recipients: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)
    questions: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)  # question template ids
    alert_frequency: Mapped[AlertFrequency] = mapped_column(
        _enum(AlertFrequency, "alert_frequency"), default=AlertFrequency.IMMEDIATE
    )
    # Which change classes alert (eo/change_classes.py; default the loss classes, repeated here because
    # core imports nothing above it) and the smallest alerting area, in hectares, that sends an alert.
    alert_classes: Mapped[list[str]] = mapped_column(
        ARRAY(Text), default=lambda: list(DEFAULT_ALERT_CLASSES),
        server_default=text("'{new_built_up_or_bare,vegetation_loss}'::text[]"),
    )
    min_alert_hectares: Mapped[float] = mapped_column(Float, default=0.2)
    # "probable": alert on first detection; "confirmed": only once the next clear acquisition still shows it.
    alert_on: Mapped[str] = mapped_column(Text, default="probable", server_default=text("'probable'"))
    pairing_policy: Mapped[PairingPolicy] = mapped_column(
        _enum(PairingPolicy, "pairing_policy"), default=PairingPolicy.LATEST
    )
    properties: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)  # user GeoJSON properties
    last_digest_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now(), onupdate=_now())

    __table_args__ = (
        Index("ix_areas_geom", "geom", postgresql_using="gist"),
        CheckConstraint("alert_on IN ('probable', 'confirmed')", name="ck_areas_alert_on"),
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


class Observation(Base):
    """One acquisition seen over one area, as the mosaic of its granules (revision 0008).

    ``covered_fraction`` = imaged pixels / area pixels; ``clear_fraction`` = clear pixels / imaged pixels
    (None when nothing was imaged). ``scene_id``: the granule that imaged the area first (labels, links).
    """

    __tablename__ = "observations"

    area_id: Mapped[int] = mapped_column(ForeignKey("areas.id", ondelete="CASCADE"), primary_key=True)
    acquisition_id: Mapped[int] = mapped_column(ForeignKey("acquisitions.id", ondelete="CASCADE"), primary_key=True)
    scene_id: Mapped[int | None] = mapped_column(ForeignKey("scenes.id", ondelete="CASCADE"))
    status: Mapped[ObservationStatus] = mapped_column(
        _enum(ObservationStatus, "observation_status"), default=ObservationStatus.PENDING
    )
    covered_fraction: Mapped[float | None] = mapped_column(Float)
    clear_fraction: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)
    computed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When its acquisition's ``unirs.observe`` task was last sent (core/observations.py; revision 0014).
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Computations started since the last stored outcome, and when the last one started (revision 0016).
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    scene: Mapped[Scene | None] = relationship(lazy="joined")

    __table_args__ = (Index("ix_observations_status", "status"),)


class Analysis(Base):
    """A unit of analysis work (area, after scene, before scene). The work-item state machine."""

    __tablename__ = "analyses"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(Text, unique=True)
    area_id: Mapped[int] = mapped_column(ForeignKey("areas.id", ondelete="CASCADE"))
    after_scene_id: Mapped[int] = mapped_column(ForeignKey("scenes.id", ondelete="CASCADE"))
    before_scene_id: Mapped[int | None] = mapped_column(ForeignKey("scenes.id", ondelete="CASCADE"))
    analyser: Mapped[str] = mapped_column(Text)  # requested: core.jobs.AnalyserSpec id
    analyser_run: Mapped[str | None] = mapped_column(Text)  # what the worker ran, checkpoint included
    question_set: Mapped[str] = mapped_column(Text)  # sorted template ids @ templates version
    pairing_policy: Mapped[str] = mapped_column(Text)
    pair_reason: Mapped[str | None] = mapped_column(Text)
    status: Mapped[AnalysisStatus] = mapped_column(
        _enum(AnalysisStatus, "analysis_status"), default=AnalysisStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(Text)
    last_error: Mapped[str | None] = mapped_column(Text)
    stats: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    area: Mapped[Area] = relationship()
    after_scene: Mapped[Scene] = relationship(foreign_keys=[after_scene_id])
    before_scene: Mapped[Scene | None] = relationship(foreign_keys=[before_scene_id])

    __table_args__ = (
        Index("ix_analyses_status_lease", "status", "lease_expires_at"),
        Index("ix_analyses_area_created", "area_id", "created_at"),
    )


class Finding(Base):
    """What an analysis found: an area-level summary, a changed region, or an answer to a question."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id", ondelete="CASCADE"))
    area_id: Mapped[int] = mapped_column(ForeignKey("areas.id", ondelete="CASCADE"))
    ordinal: Mapped[int] = mapped_column(Integer)  # position within its analysis; makes re-runs idempotent
    kind: Mapped[str] = mapped_column(Text)  # summary | region | answer | event
    change_class: Mapped[str | None] = mapped_column(Text)
    geom: Mapped[WKBElement | None] = mapped_column(Geometry("GEOMETRY", srid=4326, spatial_index=False))
    hectares: Mapped[float | None] = mapped_column(Float)
    caption: Mapped[str | None] = mapped_column(Text)
    question: Mapped[str | None] = mapped_column(Text)
    answer: Mapped[str | None] = mapped_column(Text)
    confidence: Mapped[float | None] = mapped_column(Float)
    statistics: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    analyser_name: Mapped[str] = mapped_column(Text)
    analyser_version: Mapped[str] = mapped_column(Text)
    observed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # the after scene's time
    before_observed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Regions only (workers/confirmation.py): probable on first detection → confirmed / dismissed by the
    # next clear acquisition; "redetected" when it overlaps an earlier region, linked to that change's
    # first finding (first_finding_id) so it is never alerted twice. state_changed_at: when it was settled.
    alert_state: Mapped[str | None] = mapped_column(Text)
    first_finding_id: Mapped[int | None] = mapped_column(ForeignKey("findings.id", ondelete="SET NULL"))
    state_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Regions only (workers/screen.py, revision 0010): the time-series screen's verdict — departure |
    # seasonal | atmospheric | unscreened; NULL for rows written before the screen existed.
    screen_verdict: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    images: Mapped[list[FindingImage]] = relationship(back_populates="finding", cascade="all, delete-orphan")

    __table_args__ = (
        UniqueConstraint("analysis_id", "ordinal", name="uq_findings_analysis_ordinal"),
        # Place and time in one GiST (btree_gist, revision 0002): "this box, these months" is one index scan.
        Index("ix_findings_geom_observed", "geom", "observed_at", postgresql_using="gist"),
        Index("ix_findings_area_observed", "area_id", "observed_at"),
        Index("ix_findings_observed_at", "observed_at"),
        Index("ix_findings_kind", "kind"),
        Index("ix_findings_area_state", "area_id", "alert_state", postgresql_where=text("kind = 'region'")),
        CheckConstraint("screen_verdict IN ('departure', 'seasonal', 'unscreened', 'atmospheric')",
                        name="ck_findings_screen_verdict"),
        # `findings --text` is ILIKE '%…%': trigram GIN indexes (extension pg_trgm), with the area in front
        # (btree_gin, revision 0009) so "this area, this word" is answered inside the index.
        Index("ix_findings_area_caption_trgm", "area_id", "caption", postgresql_using="gin",
              postgresql_ops={"caption": "gin_trgm_ops"}),
        Index("ix_findings_area_answer_trgm", "area_id", "answer", postgresql_using="gin",
              postgresql_ops={"answer": "gin_trgm_ops"}),
        # `findings --text` without an area, newest first: a KNN walk on observed_at testing trigrams in the
        # index (btree_gist + pg_trgm, revision 0015); the expression is monitor.findings.SEARCH_TEXT.
        Index("ix_findings_observed_text_trgm", "observed_at",
              literal_column("((COALESCE(caption, ''::text) || ' '::text) || COALESCE(answer, ''::text))")
              .label("search_text"), postgresql_using="gist", postgresql_ops={"search_text": "gist_trgm_ops"}),
        # The geometry expression of the view v_change_regions (revision 0002), so QGIS's extent filter is indexed.
        Index(
            "ix_findings_region_geom",
            text("(ST_Multi(ST_CollectionExtract(geom, 3))::geometry(MultiPolygon, 4326))"),
            postgresql_using="gist",
            postgresql_where=text("kind = 'region' AND geom IS NOT NULL AND ST_Dimension(geom) = 2"),
        ),
    )


class FindingImage(Base):
    """PNG thumbnails kept with a finding: before, after, change overlay."""

    __tablename__ = "finding_images"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    finding_id: Mapped[int] = mapped_column(ForeignKey("findings.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(Text)  # before | after | overlay
    mime_type: Mapped[str] = mapped_column(Text, default="image/png")
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)

    finding: Mapped[Finding] = relationship(back_populates="images")

    __table_args__ = (UniqueConstraint("finding_id", "role", name="uq_finding_images_role"),)


class Digest(Base):
    """A daily digest of one area: everything found in (period_start, period_end]."""

    __tablename__ = "digests"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    area_id: Mapped[int] = mapped_column(ForeignKey("areas.id", ondelete="CASCADE"))
    period_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    period_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    __table_args__ = (UniqueConstraint("area_id", "period_end", name="uq_digests_area_period"),)


class Delivery(Base):
    """One email to one recipient, or one webhook event to one endpoint (``webhook_id`` set, recipient
    ``webhook:<id>``), about one analysis or digest. Never sent twice (UNIQUE + Message-ID / webhook-id)."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    delivery_key: Mapped[str] = mapped_column(Text)  # "analysis:<id>" | "digest:<id>"
    analysis_id: Mapped[int | None] = mapped_column(ForeignKey("analyses.id", ondelete="CASCADE"))
    digest_id: Mapped[int | None] = mapped_column(ForeignKey("digests.id", ondelete="CASCADE"))
    recipient: Mapped[str] = mapped_column(Text)
    status: Mapped[DeliveryStatus] = mapped_column(
        _enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    message_id: Mapped[str] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    permanent_failure: Mapped[bool] = mapped_column(Boolean, default=False)
    skip_reason: Mapped[str | None] = mapped_column(Text)
    webhook_id: Mapped[int | None] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("delivery_key", "recipient", name="uq_deliveries_key_recipient"),
        Index("ix_deliveries_status_next", "status", "next_attempt_at"),
    )


class ApiToken(Base):
    """An API token: ``unirs_<prefix>_<secret>``; only the argon2 hash of the whole token is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(Text)
    prefix: Mapped[str] = mapped_column(Text, unique=True)  # public part: finds the row without a hash scan
    token_hash: Mapped[str] = mapped_column(Text)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text))  # "read", "write"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LoginFailure(Base):
    """A failed browser login, per key (``email:…`` / ``ip:…``): the rate limit shared by all web replicas."""

    __tablename__ = "login_failures"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    key: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    __table_args__ = (Index("ix_login_failures_key_at", "key", "at"),)


class Unsubscribe(Base):
    """A recipient who asked (one-click link, RFC 8058) to receive nothing more about an area."""

    __tablename__ = "unsubscribes"

    area_id: Mapped[int] = mapped_column(ForeignKey("areas.id", ondelete="CASCADE"), primary_key=True)
    recipient: Mapped[str] = mapped_column(Text, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())


class WebhookEndpoint(Base):
    """An HTTPS endpoint that receives one signed JSON event (Standard Webhooks) per alert of an area.

    ``secret`` (``whsec_`` + base64) signs the events, so it is stored as is; it is shown once, at creation."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    area_id: Mapped[int] = mapped_column(ForeignKey("areas.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    __table_args__ = (UniqueConstraint("area_id", "url", name="uq_webhook_endpoints_area_url"),)
