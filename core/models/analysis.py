"""Observations, analyses and their findings (with the findings' images)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from geoalchemy2 import Geometry, WKBElement
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Text,
    UniqueConstraint,
    literal_column,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from core.models.accounts import Area
from core.models.base import (
    AnalysisStatus,
    Base,
    ObservationStatus,
    _enum,
    _now,
)
from core.models.catalogue import Scene


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
    # Sends of its acquisition's task since a worker last started it (revision 0017).
    dispatches: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Where the acquisition lies against the area's geometry, set by the first analysis that reads it
    # (workers/coregistration.py; revision 0019): status, position/shift/applied px, offset_m, pairs, reason.
    coregistration: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
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
    # Messages published since the last claim (core/jobs.py; revision 0017).
    dispatches: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
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
        # The alert rule's "was this change alerted already" lookup (revision 0021).
        Index("ix_findings_first_finding", "first_finding_id", postgresql_where=text("first_finding_id IS NOT NULL")),
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
    # {"crs", "bbox": [minx, miny, maxx, maxy], "map_height_px"}: the PNG's top rows cover bbox (revision 0018).
    bounds: Mapped[dict[str, Any] | None] = mapped_column(JSONB)

    finding: Mapped[Finding] = relationship(back_populates="images")

    __table_args__ = (UniqueConstraint("finding_id", "role", name="uq_finding_images_role"),)
