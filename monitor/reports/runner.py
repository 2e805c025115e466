"""`run_deliveries()`: the periodic job of the reports stage (called by the scheduler).

One run: queue immediate alerts and webhook events, create due digests, settle claims left by dead
workers, then send every pending delivery that is due (emails to recipients who unsubscribed from the
area are marked ``skipped``, reason ``unsubscribed``, instead), then the webhook events. Each step is its
own short transaction; no transaction is open while talking to the mail server. See
:mod:`monitor.reports.ledger` for the exactly-once design.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime
from email.message import EmailMessage

from sqlalchemy import update
from sqlalchemy.orm import Session

from core.config import SenderMissing, Settings
from core.db import session_scope
from core.models import Delivery, DeliveryStatus
from monitor.reports import ledger, links
from monitor.reports.context import load_analysis_report
from monitor.reports.digest import create_due_digests, load_digest_report
from monitor.reports.immediate import create_immediate_deliveries
from monitor.reports.message import build_message
from monitor.reports.render import RenderedEmail, render_alert, render_digest
from monitor.reports.transport import DeliveryError, Transport, make_transport
from monitor.reports.webhooks import create_webhook_deliveries, send_due_webhooks

log = logging.getLogger(__name__)


def _link_pages(report, settings: Settings) -> None:
    """The map button opens the analysis page of the web app when there is one (else the OSM link stays)."""
    page = links.analysis_page_url(settings.web, report.analysis_id)
    if page:
        report.map_url = page


def render_delivery(session: Session, delivery: Delivery, settings: Settings,
                    email_links: links.EmailLinks | None = None) -> RenderedEmail:
    templates = settings.reports.templates_dir
    if delivery.analysis_id is not None:
        report = load_analysis_report(session, delivery.analysis_id, settings.public_url)
        _link_pages(report, settings)
        return render_alert(report, delivery.recipient, templates_dir=templates, links=email_links)
    if delivery.digest_id is not None:
        digest = load_digest_report(session, delivery.digest_id, settings)
        for report in {id(r): r for r in digest.analyses + digest.detailed}.values():
            _link_pages(report, settings)
        return render_digest(digest, delivery.recipient, templates_dir=templates, links=email_links)
    raise LookupError(f"delivery {delivery.id} ({delivery.delivery_key}) has neither an analysis nor a digest")


def skip_if_unsubscribed(session: Session, delivery_id: int) -> bool:
    """pending → skipped (reason ``unsubscribed``) if the recipient unsubscribed from the delivery's area."""
    done = session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.status == DeliveryStatus.PENDING, Delivery.webhook_id.is_(None),
               links.unsubscribed_sql())
        .values(status=DeliveryStatus.SKIPPED, skip_reason=links.SKIP_UNSUBSCRIBED, next_attempt_at=None)
        .returning(Delivery.id)
    ).one_or_none()
    return done is not None


def prepare_message(session: Session, delivery_id: int, settings: Settings, now: datetime) -> EmailMessage | None:
    """The finished message of a pending delivery, or None if it is no longer pending."""
    delivery = session.get(Delivery, delivery_id)
    if delivery is None or delivery.status != DeliveryStatus.PENDING:
        return None
    area_id = links.delivery_area_id(session, delivery)
    email_links = links.email_links(settings.web, area_id, delivery.recipient) if area_id is not None else None
    rendered = render_delivery(session, delivery, settings, email_links)
    return build_message(
        rendered, sender=settings.smtp.from_address(), recipient=delivery.recipient, message_id=delivery.message_id,
        delivery_key=delivery.delivery_key, date=now, headers=email_links.headers if email_links else None,
    )


def recover_stale(transport: Transport, now: datetime, settings: Settings) -> Counter[str]:
    counts: Counter[str] = Counter()
    with session_scope(settings) as session:
        for stale in ledger.stale_sending(session, now, webhooks=False):
            delivered = transport.was_delivered(stale.message_id)
            outcome = ledger.resolve_stale(session, stale, delivered, now, settings.smtp)
            counts[f"recovered_{outcome}"] += 1
    return counts


def _render_failed(delivery_id: int, exc: Exception, now: datetime, settings: Settings) -> str:
    log.exception("delivery %s: could not render the message", delivery_id)
    with session_scope(settings) as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:  # deleted with its analysis or area meanwhile
            return "skipped"
        attempts = delivery.attempts + 1
        return ledger.record_failure(
            session, delivery_id, attempts, f"rendering failed: {type(exc).__name__}: {exc}", permanent=False,
            now=now, smtp=settings.smtp, from_status=DeliveryStatus.PENDING,
        )


def send_due(transport: Transport, now: datetime, settings: Settings, limit: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    with session_scope(settings) as session:
        ids = ledger.due_ids(session, now, limit)
    for delivery_id in ids:
        try:
            with session_scope(settings) as session:
                if skip_if_unsubscribed(session, delivery_id):
                    counts["unsubscribed"] += 1
                    continue
                message = prepare_message(session, delivery_id, settings, now)
        except Exception as exc:
            counts[_render_failed(delivery_id, exc, now, settings)] += 1
            continue
        if message is None:
            counts["skipped"] += 1
            continue
        with session_scope(settings) as session:
            claim = ledger.claim(session, delivery_id, now, settings.smtp.lease_seconds)
        if claim is None:  # another runner took it between our read and our claim
            counts["skipped"] += 1
            continue
        try:
            transport.send(message, claim.recipient)
        except DeliveryError as exc:
            with session_scope(settings) as session:
                status = ledger.record_failure(session, claim.id, claim.attempts, exc.reason, exc.permanent, now,
                                               settings.smtp)
            counts["failed" if status == "failed" else "retry"] += 1
            log.warning("delivery %s to %s (attempt %d): %s → %s", claim.id, claim.recipient, claim.attempts,
                        exc.reason, status)
            if exc.unreachable:
                log.warning("%s unavailable; leaving the remaining deliveries for the next run", transport.name)
                break
            continue
        with session_scope(settings) as session:
            ledger.mark_sent(session, claim.id, datetime.now(UTC))
        counts["sent"] += 1
        log.info("delivery %s (%s) sent to %s via %s as %s", claim.id, claim.delivery_key, claim.recipient,
                 transport.name, claim.message_id)
    return counts


def run_deliveries(settings: Settings, *, now: datetime | None = None,
                   limit: int = 200) -> dict[str, int]:
    """Queue what is due, then send it. Returns counts of what happened (for logs, metrics and tests)."""
    now = now or datetime.now(UTC)
    counts: Counter[str] = Counter()
    with session_scope(settings) as session:
        counts["alerts_queued"] = create_immediate_deliveries(session, now, settings)
    with session_scope(settings) as session:
        counts["webhooks_queued"] = create_webhook_deliveries(session, now, settings)
    with session_scope(settings) as session:
        counts["digests_created"], counts["digest_deliveries_queued"] = create_due_digests(session, now, settings)
    try:
        settings.smtp.from_address()
    except SenderMissing as exc:
        log.error("%s", exc)  # every run until configured: queued emails wait, nothing is lost
        counts["sender_missing"] = 1
    else:
        transport = make_transport(settings.smtp)
        try:
            counts.update(recover_stale(transport, now, settings))
            counts.update(send_due(transport, now, settings, limit))
        finally:
            transport.close()
    counts.update(send_due_webhooks(now, settings, limit))
    return _result(counts)


def _result(counts: Counter[str]) -> dict[str, int]:
    result = {key: 0 for key in ("alerts_queued", "digests_created", "digest_deliveries_queued", "sent", "retry",
                                 "failed", "unsubscribed", "webhooks_queued", "webhooks_sent", "webhooks_retry",
                                 "webhooks_failed", "webhooks_disabled")}
    result.update(counts)
    if any(result.values()):
        log.info("deliveries run: %s", ", ".join(f"{k}={v}" for k, v in sorted(result.items()) if v))
    return result
