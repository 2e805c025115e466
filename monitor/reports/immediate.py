"""Immediate alerts: a delivery per recipient for each finished analysis that matters.

An analysis matters when its *alerting* hectares — the regions whose change class is one of the area's
``alert_classes`` (default the loss classes, :mod:`eo.change_classes`) and whose change no other analysis
has alerted (:func:`region_alerts_sql`: the first detection, probable or confirmed — only confirmed when
the area has ``alert_on = confirmed``, then the alert goes out when the next clear acquisition confirms
it — or, while the change was never alerted, a re-detection linked to it), summed; for an analysis that
wrote no regions, its summary's total when the summary's class alerts — are above zero and reach the
area's ``min_alert_hectares``. So each change is alerted once: when first seen if it reaches the minimum,
else on the first re-detection that does. Reports show the same regions (:func:`alerting_region_ids`).
Vegetation gain on an area that watches for loss is a finding, never an alert. Analyses that do not
matter get no delivery row at all; they still appear in the findings query and, for daily areas, in the
digest.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import and_, any_, case, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from core.config import Settings
from core.models import AlertFrequency, Analysis, AnalysisStatus, Area, AreaStatus, Delivery, Finding
from monitor.reports.ledger import NewDelivery, insert_deliveries

log = logging.getLogger(__name__)


def _wanted(state):
    """``state`` is one an alert goes out on: probable or confirmed, only confirmed for ``alert_on = confirmed``."""
    return case((Area.alert_on == "confirmed", state == "confirmed"), else_=state.in_(("probable", "confirmed")))


def region_alerts_sql():
    """The condition under which a region finding counts towards its area's alert (correlated on Area and
    Finding): an alerting class, and a change (the first finding and the re-detections linked to it) that
    no other analysis had alerted (a delivery row of any channel) before this one's first delivery, and either

    - the first detection of its change, probable or confirmed (only confirmed for ``alert_on =
      'confirmed'``), or
    - a re-detection of a change whose first finding is probable or confirmed (so: only confirmed …) but
      was never alerted — it was under the area's minimum, or hidden behind clouds until confirmed.

    So a change first seen under ``min_alert_hectares`` is alerted once, on the first analysis whose
    alerting regions reach the minimum, and never again (issue 15: the 2018 west patches, 0.14 ha on
    2018-05-02, are alerted when re-detected). Regions of the same change in one analysis all count:
    that analysis is the one alert for them."""
    state = func.coalesce(Finding.alert_state, "probable")  # rows from before revision 0005: probable
    root, other = aliased(Finding, name="alert_root"), aliased(Finding, name="alert_other")
    change = func.coalesce(Finding.first_finding_id, Finding.id)
    # "Before" by delivery id, not by date: a report rendered later (a retry, the web page) must count what
    # its alert counted, even after a later analysis of the same change was alerted for its other regions.
    own = aliased(Delivery, name="own_delivery")
    own_first = (select(func.min(own.id)).where(own.analysis_id == Finding.analysis_id)
                 .correlate_except(own).scalar_subquery())  # Finding is two levels up
    alerted_elsewhere = exists().where(
        other.area_id == Finding.area_id, or_(other.id == change, other.first_finding_id == change),
        other.analysis_id != Finding.analysis_id, Delivery.analysis_id == other.analysis_id,
        or_(own_first.is_(None), Delivery.id < own_first))
    first = and_(Finding.first_finding_id.is_(None), _wanted(state))
    # The area's rule outside the EXISTS: Area belongs to the outer query, two levels up.
    root_state = func.coalesce(root.alert_state, "probable")
    unsent_redetection = case(
        (Area.alert_on == "confirmed", exists().where(root.id == Finding.first_finding_id, root_state == "confirmed")),
        else_=exists().where(root.id == Finding.first_finding_id, root_state.in_(("probable", "confirmed"))))
    return and_(
        Finding.change_class == any_(Area.alert_classes),
        or_(first, unsent_redetection),
        ~alerted_elsewhere,
    )


def alerting_region_ids(session: Session, analysis_id: int) -> set[int]:
    """Ids of the region findings of ``analysis_id`` that count towards its alert now
    (:func:`region_alerts_sql`); what a report shows as alerting. Empty for an unknown analysis."""
    return set(session.scalars(
        select(Finding.id).join(Area, Area.id == Finding.area_id)
        .where(Finding.analysis_id == analysis_id, Finding.kind == "region", region_alerts_sql())
    ))


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
    for k, row in enumerate(candidates):
        if k and not still_alerts(session, row.id):
            continue  # an earlier candidate of this run alerted the same change (its re-detection here)
        n = insert_deliveries(session, [
            NewDelivery(f"analysis:{row.id}", recipient, analysis_id=row.id) for recipient in row.recipients
        ])
        created += n
        log.info("analysis %s (area %r): %.2f ha of %s ≥ %.2f ha threshold; alert queued for %d recipient(s)",
                 row.id, row.name, row.changed_ha, "/".join(row.alert_classes), row.min_alert_hectares, n)
    return created


def still_alerts(session: Session, analysis_id: int) -> bool:
    """Whether ``analysis_id`` still reaches its area's minimum after the deliveries queued so far
    (flushed; any channel): two analyses re-detecting one unsent change, decided in one run, must not both
    alert it — the later one is skipped."""
    session.flush()
    changed = alert_hectares_sql()
    return bool(session.execute(
        select((changed > 0) & (changed >= Area.min_alert_hectares))
        .select_from(Analysis).join(Area, Area.id == Analysis.area_id).where(Analysis.id == analysis_id)
    ).scalar())
