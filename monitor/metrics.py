"""Prometheus metrics read from PostgreSQL at scrape time, and the "no clear scene for N days" alarm.

The state of the service lives in the database, so :class:`StateCollector` reads it there on every
scrape: the numbers are the same whichever process (leader or stand-by scheduler, ``unirs-monitor
metrics``) is scraped, and nothing is lost when a process restarts. A scrape never raises: a failed
query is logged and exposed as ``unirs_metrics_scrape_error 1``.

Exposition: the scheduler serves them when ``UNIRS_METRICS_PORT`` is set (bound to
``UNIRS_METRICS_ADDR``, loopback by default); ``unirs-monitor metrics`` prints them once (debugging,
node_exporter textfile collector) or serves them with ``--serve PORT``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Numeric, and_, case, cast, func, select
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import session_scope
from core.models import (
    Analysis,
    AnalysisStatus,
    Area,
    AreaStatus,
    Catalogue,
    Delivery,
    DeliveryStatus,
    Observation,
    ObservationStatus,
    PollState,
    QuarantinedItem,
    Scene,
)
from monitor.reports.ledger import is_unknown

log = logging.getLogger(__name__)

# A scrape that takes longer than this is abandoned (and reported as a scrape error), not left hanging.
STATEMENT_TIMEOUT_MS = 10_000


def last_clear_scenes(session: Session) -> list[tuple[str, datetime, datetime | None]]:
    """(name, created_at, acquisition time of the latest clear scene or None) of every ACTIVE area."""
    rows = session.execute(
        select(Area.name, Area.created_at, func.max(Scene.acquired_at))
        .select_from(Area)
        .outerjoin(Observation, and_(Observation.area_id == Area.id, Observation.status == ObservationStatus.CLEAR))
        .outerjoin(Scene, Scene.id == Observation.scene_id)
        .where(Area.status == AreaStatus.ACTIVE)
        .group_by(Area.id)
        .order_by(Area.name)
    ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def _without_clear(rows: Iterable[tuple[str, datetime, datetime | None]], days: float,
                   now: datetime) -> list[tuple[str, datetime | None]]:
    limit = now - timedelta(days=days)
    return [(name, last) for name, created, last in rows if (last or created) < limit]


def areas_without_clear_scene(session: Session, days: float, *,
                              now: datetime | None = None) -> list[tuple[str, datetime | None]]:
    """Active areas whose latest clear scene was acquired more than ``days`` ago, as (name, last clear or None).

    An area that never had a clear scene counts from its creation (a new area is not flagged at once).
    """
    return _without_clear(last_clear_scenes(session), days, now or datetime.now(UTC))


def _label(value: Any) -> str:
    if value is None:
        return ""
    return str(value.value if hasattr(value, "value") else value)


def _by_status(name: str, doc: str, rows: Iterable[tuple[Any, int]], statuses: Iterable[Any]) -> GaugeMetricFamily:
    """One sample per known status (0 when there are none), so alert rules never see a missing series."""
    counts = {s.value: 0 for s in statuses}
    for status, n in rows:
        counts[_label(status)] = int(n)
    family = GaugeMetricFamily(name, doc, labels=["status"])
    for status, n in counts.items():
        family.add_metric([status], n)
    return family


def _json_int(key: str) -> Any:
    """Sum-able value of ``analyses.stats[key]``: the number when it is one, else NULL (never a cast error)."""
    return case((func.jsonb_typeof(Analysis.stats[key]) == "number", cast(Analysis.stats[key].astext, Numeric)))


def read_state(session: Session, settings: Settings, now: datetime | None = None) -> list[Metric]:
    """Every metric family, one SQL statement each."""
    now = now or datetime.now(UTC)
    session.execute(select(func.set_config("statement_timeout", str(STATEMENT_TIMEOUT_MS), True)))
    families: list[Metric] = []

    scenes = GaugeMetricFamily("unirs_scenes_total", "Scenes stored (distinct acquisitions seen), by catalogue "
                               "and collection.", labels=["catalogue", "collection"])
    for cat, collection, n in session.execute(
        select(Catalogue.name, Scene.collection, func.count())
        .select_from(Scene)
        .join(Catalogue, Catalogue.id == Scene.catalogue_id)
        .group_by(Catalogue.name, Scene.collection)
        .order_by(Catalogue.name, Scene.collection)
    ):
        scenes.add_metric([cat, _label(collection)], n)
    families.append(scenes)

    quarantined = GaugeMetricFamily("unirs_quarantined_items_total", "STAC items that could not be ingested "
                                    "(kept with the reason), by catalogue.", labels=["catalogue"])
    for cat, n in session.execute(
        select(Catalogue.name, func.count())
        .select_from(QuarantinedItem)
        .join(Catalogue, Catalogue.id == QuarantinedItem.catalogue_id)
        .group_by(Catalogue.name)
        .order_by(Catalogue.name)
    ):
        quarantined.add_metric([cat], n)
    families.append(quarantined)

    families.append(_by_status(
        "unirs_observations", "Observations (scene over area) by status.",
        session.execute(select(Observation.status, func.count()).group_by(Observation.status)), ObservationStatus))
    families.append(_by_status(
        "unirs_analyses", "Analyses by status.",
        session.execute(select(Analysis.status, func.count()).group_by(Analysis.status)), AnalysisStatus))

    oldest = session.scalar(
        select(func.min(Analysis.created_at))
        .where(Analysis.status.in_([AnalysisStatus.PENDING, AnalysisStatus.QUEUED]))
    )
    families.append(GaugeMetricFamily(
        "unirs_queue_lag_seconds", "Age of the oldest pending or queued analysis (0 when none waits).",
        value=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0))

    emails = Delivery.webhook_id.is_(None)
    families.append(_by_status(
        "unirs_emails", "Email deliveries by status (skipped: the recipient unsubscribed).",
        session.execute(select(Delivery.status, func.count()).where(emails).group_by(Delivery.status)),
        DeliveryStatus))
    families.append(_by_status(
        "unirs_webhook_events", "Webhook events (one per alert and endpoint) by status.",
        session.execute(select(Delivery.status, func.count()).where(~emails).group_by(Delivery.status)),
        DeliveryStatus))
    failed, unknown = session.execute(select(
        func.count().filter(Delivery.status == DeliveryStatus.FAILED), func.count().filter(is_unknown()))
        .where(emails)).one()
    attention = GaugeMetricFamily(
        "unirs_email_deliveries_needing_attention",
        "Failed email deliveries by kind: outcome_unknown (sender died mid-SMTP; check the mail log, then "
        "`unirs-monitor deliveries requeue ID`) and failed (rejected or out of attempts).", labels=["kind"])
    attention.add_metric(["outcome_unknown"], float(unknown))
    attention.add_metric(["failed"], float(failed - unknown))
    families.append(attention)

    kept_off, sent = session.execute(
        select(func.coalesce(func.sum(_json_int("chips_kept_off_model")), 0),
               func.coalesce(func.sum(_json_int("chips_sent_to_model")), 0))
    ).one()
    families.append(GaugeMetricFamily(
        "unirs_chips_kept_off_model_total", "Chips the spectral screen kept off the GPU, summed over analyses.",
        value=float(kept_off)))
    families.append(GaugeMetricFamily(
        "unirs_chips_sent_to_model_total", "Chips sent to the UniRS model, summed over analyses.", value=float(sent)))

    rows = last_clear_scenes(session)
    flagged = {name for name, _ in _without_clear(rows, settings.reports.no_clear_scene_days, now)}
    without = GaugeMetricFamily(
        "unirs_areas_without_clear_scene",
        f"1 when an active area has had no clear scene for {settings.reports.no_clear_scene_days:g} days "
        "(reports.no_clear_scene_days; counted from its creation when it never had one), else 0.",
        labels=["area"])
    since = GaugeMetricFamily(
        "unirs_seconds_since_last_clear_scene",
        "Seconds since the acquisition of the latest clear scene of an active area (since its creation if none).",
        labels=["area"])
    for name, created, last in rows:
        without.add_metric([name], 1 if name in flagged else 0)
        since.add_metric([name], max(0.0, (now - (last or created)).total_seconds()))
    families += [without, since]

    polls = GaugeMetricFamily(
        "unirs_last_successful_poll_timestamp_seconds", "Unix time of the last successful poll.",
        labels=["catalogue", "collection"])
    for cat, collection, at in session.execute(
        select(Catalogue.name, PollState.collection, PollState.last_success_at)
        .select_from(PollState)
        .join(Catalogue, Catalogue.id == PollState.catalogue_id)
        .where(PollState.last_success_at.is_not(None))
        .order_by(Catalogue.name, PollState.collection)
    ):
        polls.add_metric([cat, collection], at.timestamp())
    families.append(polls)

    late = CounterMetricFamily(
        "unirs_late_items", "Granules first seen more than the look-back after they were sensed (published "
        "late; found by the late sweep or a poll), stored and analysed like any other.",
        labels=["catalogue", "collection"])
    for cat, collection, n in session.execute(
        select(Catalogue.name, PollState.collection, PollState.late_items)
        .select_from(PollState)
        .join(Catalogue, Catalogue.id == PollState.catalogue_id)
        .order_by(Catalogue.name, PollState.collection)
    ):
        late.add_metric([cat, collection], float(n or 0))
    families.append(late)
    return families


class StateCollector(Collector):
    """Reads the service state from PostgreSQL on every scrape."""

    def __init__(self, settings: Settings):
        self._settings = settings

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        error = 0
        families: list[Metric] = []
        try:
            with session_scope(self._settings) as session:
                families = read_state(session, self._settings)
        except Exception:
            log.exception("metrics scrape failed")
            error, families = 1, []
        yield from families
        yield GaugeMetricFamily("unirs_metrics_scrape_error", "1 when reading the state for this scrape failed.",
                                value=error)
        yield GaugeMetricFamily("unirs_metrics_scrape_duration_seconds", "Time spent reading the state.",
                                value=time.monotonic() - started)


def make_registry(settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)  # no database query at registration
    registry.register(StateCollector(settings))
    return registry


def serve(port: int, addr: str, settings: Settings) -> Any:
    """Serve /metrics on addr:port in a daemon thread; returns the server (``shutdown()`` stops it)."""
    server, _thread = start_http_server(port, addr=addr, registry=make_registry(settings))
    log.info("metrics on http://%s:%d/metrics", addr, port)
    return server


def exposition(settings: Settings) -> bytes:
    return generate_latest(make_registry(settings))
