"""Daily digests: one email per recipient of a `daily` area with everything since the previous digest,
plus a health section (is the pipeline still watching this area?).

A digest covers (period_start, period_end] of analysis completion times. period_end lags "now" by
``digest_settle_minutes`` so an analysis whose transaction started before period_end but commits after
it is not missed by both this digest and the next. Creating the digest row, its deliveries and moving
``areas.last_digest_at`` happen in one transaction on the area row locked ``FOR UPDATE SKIP LOCKED``: two
runners cannot create two digests for the same period.

Digests are sent even when nothing changed: a daily "no change, 3 clear scenes looked at" is how users
know the silence means nothing happened rather than that the pipeline stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import any_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core.config import Settings
from core.models import (
    AlertFrequency,
    Analysis,
    AnalysisStatus,
    Area,
    AreaStatus,
    Catalogue,
    Digest,
    Finding,
    Observation,
    ObservationStatus,
    PollState,
    Scene,
)
from eo.change_classes import label
from monitor.reports.context import AnalysisReport, load_analysis_report
from monitor.reports.ledger import NewDelivery, Problem, insert_deliveries, problems

log = logging.getLogger(__name__)


@dataclass
class FailedAnalysis:
    analysis_id: int
    after_acquired_at: datetime | None
    attempts: int
    last_error: str


@dataclass
class PollHealth:
    catalogue: str
    collection: str
    last_success_at: datetime | None
    last_error: str | None


@dataclass
class Health:
    last_clear_at: datetime | None
    days_since_clear: float | None
    no_clear_days: float
    scenes_seen: int
    scenes_clear: int
    analyses_by_status: dict[str, int]
    failed: list[FailedAnalysis]
    polls: list[PollHealth]
    # Emails of this area that did not arrive: outcome unknown (sender died mid-SMTP) or failed.
    deliveries: list[Problem] = field(default_factory=list)

    @property
    def no_clear_warning(self) -> bool:
        return self.days_since_clear is None or self.days_since_clear >= self.no_clear_days

    @property
    def ok(self) -> bool:
        return (not self.no_clear_warning and not self.failed and not any(p.last_error for p in self.polls)
                and not self.deliveries)


@dataclass
class SettledChange:
    """A change region confirmed or dismissed in the digest's period (workers/confirmation.py)."""

    finding_id: int
    analysis_id: int
    change_class: str
    hectares: float
    state: str  # confirmed | dismissed
    first_seen: datetime  # the acquisition it was first detected on
    settled_by: str | None  # the acquisition date that confirmed or dismissed it
    settled_at: datetime

    @property
    def label(self) -> str:
        return label(self.change_class)


@dataclass
class DigestReport:
    digest_id: int
    area_id: int
    area_name: str
    period_start: datetime | None
    period_end: datetime
    min_alert_hectares: float
    analyses: list[AnalysisReport]  # everything in the period, newest acquisition first
    detailed: list[AnalysisReport]  # the largest changes, with images and answers
    health: Health = field(repr=False)
    settled: list[SettledChange] = field(default_factory=list)  # confirmed or dismissed in the period

    @property
    def confirmed(self) -> list[SettledChange]:
        return [c for c in self.settled if c.state == "confirmed"]

    @property
    def dismissed(self) -> list[SettledChange]:
        return [c for c in self.settled if c.state == "dismissed"]

    @property
    def total_hectares(self) -> float:
        return sum(a.total_hectares for a in self.analyses)

    @property
    def significant(self) -> list[AnalysisReport]:
        # Same rule as an immediate alert: the alerting classes' hectares, not all change.
        return [a for a in self.analyses if a.alert_hectares > 0 and a.alert_hectares >= self.min_alert_hectares]

    @property
    def sentinel2(self) -> bool:
        return any(a.sentinel2 for a in self.analyses)


def create_due_digests(session: Session, now: datetime, settings: Settings) -> tuple[int, int]:
    """Create the digests that are due and their deliveries. Returns (digests, deliveries) created."""
    cfg = settings.reports
    period_end = now - timedelta(minutes=cfg.digest_settle_minutes)
    interval = timedelta(hours=cfg.digest_interval_hours)
    areas = session.execute(
        select(Area.id, Area.name, Area.recipients, Area.last_digest_at)
        .where(
            Area.alert_frequency == AlertFrequency.DAILY,
            Area.status == AreaStatus.ACTIVE,
            func.cardinality(Area.recipients) > 0,
            or_(Area.last_digest_at.is_(None), Area.last_digest_at <= period_end - interval),
        )
        .order_by(Area.id)
        .with_for_update(skip_locked=True)
    ).all()
    digests = deliveries = 0
    for area in areas:
        # The first digest of an area covers one interval, not its whole history.
        start = area.last_digest_at or period_end - interval
        digest_id = session.scalar(
            insert(Digest)
            .values(area_id=area.id, period_start=start, period_end=period_end)
            .on_conflict_do_nothing(constraint="uq_digests_area_period")
            .returning(Digest.id)
        )
        session.execute(update(Area).where(Area.id == area.id).values(last_digest_at=period_end))
        if digest_id is None:
            continue
        n = insert_deliveries(session, [
            NewDelivery(f"digest:{digest_id}", recipient, digest_id=digest_id) for recipient in area.recipients
        ])
        digests += 1
        deliveries += n
        log.info("digest %s for area %r covering %s .. %s queued for %d recipient(s)",
                 digest_id, area.name, start.isoformat(timespec="minutes"),
                 period_end.isoformat(timespec="minutes"), n)
    return digests, deliveries


def _finished():
    return func.coalesce(Analysis.finished_at, Analysis.started_at, Analysis.created_at)


def load_health(session: Session, area_id: int, start: datetime | None, end: datetime, settings: Settings) -> Health:
    in_period = [_finished() <= end] + ([_finished() > start] if start else [])
    last_clear = session.scalar(
        select(func.max(Scene.acquired_at))
        .join(Observation, Observation.scene_id == Scene.id)
        .where(Observation.area_id == area_id, Observation.status == ObservationStatus.CLEAR,
               Scene.acquired_at <= end)
    )
    seen_filter = [Observation.area_id == area_id, Observation.created_at <= end]
    if start:
        seen_filter.append(Observation.created_at > start)
    seen = session.execute(
        select(func.count(), func.count().filter(Observation.status == ObservationStatus.CLEAR)).where(*seen_filter)
    ).one()
    by_status = dict(session.execute(
        select(Analysis.status, func.count()).where(Analysis.area_id == area_id, *in_period).group_by(Analysis.status)
    ).all())
    failed = session.execute(
        select(Analysis.id, Scene.acquired_at, Analysis.attempts, Analysis.last_error)
        .join(Scene, Scene.id == Analysis.after_scene_id)
        .where(Analysis.area_id == area_id, Analysis.status == AnalysisStatus.FAILED, *in_period)
        .order_by(Analysis.id)
        .limit(20)
    ).all()
    polls = session.execute(
        select(Catalogue.name, PollState.collection, PollState.last_success_at, PollState.last_error)
        .join(Catalogue, Catalogue.id == PollState.catalogue_id)
        .order_by(Catalogue.name, PollState.collection)
    ).all()
    return Health(
        last_clear_at=last_clear,
        days_since_clear=(end - last_clear).total_seconds() / 86400 if last_clear else None,
        no_clear_days=settings.reports.no_clear_scene_days,
        scenes_seen=seen[0],
        scenes_clear=seen[1],
        analyses_by_status={str(k.value if hasattr(k, "value") else k): v for k, v in by_status.items()},
        failed=[FailedAnalysis(r[0], r[1], r[2], r[3] or "no error recorded") for r in failed],
        polls=[PollHealth(*r) for r in polls],
        deliveries=problems(session, area_id=area_id, limit=20),
    )


def load_digest_report(session: Session, digest_id: int, settings: Settings) -> DigestReport:
    digest = session.get(Digest, digest_id)
    if digest is None:
        raise LookupError(f"digest {digest_id} does not exist")
    area = session.get(Area, digest.area_id)
    in_period = [_finished() <= digest.period_end] + (
        [_finished() > digest.period_start] if digest.period_start else []
    )
    ids = list(session.scalars(
        select(Analysis.id)
        .where(Analysis.area_id == area.id, Analysis.status == AnalysisStatus.DONE, *in_period)
        .order_by(Analysis.id)
    ))
    base = settings.public_url
    reports = [load_analysis_report(session, i, base, with_images=False) for i in ids]
    reports.sort(key=lambda r: r.after.acquired_at, reverse=True)
    top = sorted((r for r in reports if r.total_hectares > 0), key=lambda r: -r.total_hectares)
    detailed = [
        load_analysis_report(session, r.analysis_id, base) for r in top[: settings.reports.digest_detailed_analyses]
    ]
    return DigestReport(
        digest_id=digest.id,
        area_id=area.id,
        area_name=area.name,
        period_start=digest.period_start,
        period_end=digest.period_end,
        min_alert_hectares=area.min_alert_hectares,
        analyses=reports,
        detailed=detailed,
        health=load_health(session, area.id, digest.period_start, digest.period_end, settings),
        settled=load_settled(session, area.id, digest.period_start, digest.period_end),
    )


def load_settled(session: Session, area_id: int, start: datetime | None, end: datetime) -> list[SettledChange]:
    """Regions of the area's alerting classes confirmed or dismissed in (start, end], oldest first."""
    where = [Finding.area_id == area_id, Finding.kind == "region", Finding.alert_state.in_(("confirmed", "dismissed")),
             Finding.state_changed_at <= end, Finding.change_class == any_(Area.alert_classes)]
    if start is not None:
        where.append(Finding.state_changed_at > start)
    rows = session.execute(
        select(Finding.id, Finding.analysis_id, Finding.change_class, Finding.hectares, Finding.alert_state,
               Finding.observed_at, Finding.statistics, Finding.state_changed_at)
        .join(Area, Area.id == Finding.area_id)
        .where(*where)
        .order_by(Finding.state_changed_at, Finding.id)
    ).all()
    return [SettledChange(r.id, r.analysis_id, r.change_class or "unclassified", r.hectares or 0.0, r.alert_state,
                          r.observed_at, ((r.statistics or {}).get("settlement") or {}).get("settled_by"),
                          r.state_changed_at) for r in rows]
