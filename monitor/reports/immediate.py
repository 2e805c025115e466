"""Immediate alerts: a delivery per recipient for each finished analysis that matters.

An analysis matters when its *alerting* hectares — the regions whose change class is one of the area's
``alert_classes`` (default the loss classes, :mod:`eo.change_classes`), that are the first detection of
their change (a re-detected region links to its first finding and is never alerted again) and that are
probable or confirmed (only confirmed when the area has ``alert_on = confirmed``; then the alert goes
out when the next clear acquisition confirms the change), summed; for an analysis that
wrote no regions, its summary's total when the summary's class alerts — are above zero and reach the
area's ``min_alert_hectares`` (the same rule as :func:`monitor.reports.context.alerting_hectares`).
Vegetation gain on an area that watches for loss is a finding, never an alert. Analyses that do not
matter get no delivery row at all; they still appear in the findings query and, for daily areas, in the
digest.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import and_, any_, case, exists, func, or_, select
from sqlalchemy.orm import Session

from core.config import Settings
from core.models import AlertFrequency, Analysis, AnalysisStatus, Area, AreaStatus, Delivery, Finding
from monitor.reports.ledger import NewDelivery, insert_deliveries

log = logging.getLogger(__name__)


def region_alerts_sql():
    """The condition under which a region finding counts towards its area's alert (correlated on Area):
    an alerting class, the first detection of its change (not linked to an earlier finding), and
    probable or confirmed — only confirmed for areas with ``alert_on = 'confirmed'``."""
    state = func.coalesce(Finding.alert_state, "probable")  # rows from before revision 0005: probable
    return and_(
        Finding.change_class == any_(Area.alert_classes),
        Finding.first_finding_id.is_(None),
        case((Area.alert_on == "confirmed", state == "confirmed"), else_=state.in_(("probable", "confirmed"))),
    )


def alert_hectares_sql():
    """Correlated scalar subquery: alerting hectares of ``Analysis.id`` under its area's alert rule."""
    alerting = region_alerts_sql()
    regions = func.count().filter(Finding.kind == "region")
    return (
        select(
            case(
                (regions > 0, func.coalesce(func.sum(Finding.hectares).filter(Finding.kind == "region", alerting),
                                            0.0)),
                else_=func.coalesce(func.max(Finding.hectares).filter(Finding.kind == "summary", alerting), 0.0),
            )
        )
        .where(Finding.analysis_id == Analysis.id)
        .correlate(Analysis, Area)
        .scalar_subquery()
    )


def create_immediate_deliveries(session: Session, now: datetime, settings: Settings) -> int:
    """Queue alerts for significant analyses finished within the look-back window. Returns rows created."""
    changed = alert_hectares_sql()
    since = now - timedelta(days=settings.reports.immediate_lookback_days)
    candidates = session.execute(
        select(Analysis.id, Area.name, Area.recipients, Area.min_alert_hectares, Area.alert_classes,
               changed.label("changed_ha"))
        .join(Area, Area.id == Analysis.area_id)
        .where(
            Analysis.status == AnalysisStatus.DONE,
            or_(
                func.coalesce(Analysis.finished_at, Analysis.created_at) >= since,
                # Confirmed-only areas: the change is alerted when a later acquisition confirms it.
                exists().where(Finding.analysis_id == Analysis.id, Finding.kind == "region",
                               Finding.state_changed_at >= since),
            ),
            Area.alert_frequency == AlertFrequency.IMMEDIATE,
            Area.status == AreaStatus.ACTIVE,
            func.cardinality(Area.recipients) > 0,
            # Recipients added later do not get alerts about analyses already reported to others.
            ~exists().where(Delivery.analysis_id == Analysis.id, Delivery.webhook_id.is_(None)),
            changed > 0,
            changed >= Area.min_alert_hectares,
        )
        .order_by(Analysis.id)
    ).all()
    created = 0
    for row in candidates:
        n = insert_deliveries(session, [
            NewDelivery(f"analysis:{row.id}", recipient, analysis_id=row.id) for recipient in row.recipients
        ])
        created += n
        log.info("analysis %s (area %r): %.2f ha of %s ≥ %.2f ha threshold; alert queued for %d recipient(s)",
                 row.id, row.name, row.changed_ha, "/".join(row.alert_classes), row.min_alert_hectares, n)
    return created
