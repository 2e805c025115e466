"""Webhooks: one signed JSON event per alert to each HTTPS endpoint of the area (Standard Webhooks).

An event is a row of the deliveries ledger (``webhook_id`` set, recipient ``webhook:<endpoint id>``), so it
is created once (UNIQUE delivery key + recipient), claimed before the request, retried with backoff and
settled after a crash like an email (:mod:`monitor.reports.ledger`). The difference: a sender that died
mid-request leaves the event to be sent again with the same ``webhook-id`` header, which receivers use to
drop the duplicate (the Standard Webhooks rule), so nothing is lost.

Request: ``POST`` JSON ``{"type": "alert.created", "timestamp": …, "data": {…}}`` with ``webhook-id``,
``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature`` (``v1,`` base64
HMAC-SHA256 of ``id.timestamp.body`` under the endpoint's ``whsec_`` secret). Any 2xx is success;
408, 429, 5xx and connection failures are retried; other answers (redirects included: they are never
followed) fail the event for good. The URL passes :func:`eo.security.check_webhook_url` when it is added
and again before every request, which connects to an address that check resolved (no DNS rebinding).

Which analyses: the same rule as immediate emails (:mod:`monitor.reports.immediate`: alerting hectares
above zero and at least ``min_alert_hectares``, finished within ``reports.immediate_lookback_days``), for
active areas whatever their email frequency. Endpoints added later do not receive events about analyses
already sent to the area's other endpoints.

A disabled endpoint (``enabled`` false: ``unirs-monitor webhooks disable ID`` or ``PATCH``) gets no requests:
its events are still created, and end ``skipped`` with ``skip_reason`` ``webhook disabled`` when they come
due — the ledger's rule for emails to unsubscribed recipients — so enabling it again does not replay the
alerts of the time it was off.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import secrets
import socket
import ssl
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from core.config import Settings, WebhookSettings
from core.db import session_scope
from core.models import Analysis, AnalysisStatus, Area, AreaStatus, Delivery, DeliveryStatus, Finding, WebhookEndpoint
from eo.security import HrefRefused, check_webhook_url, webhook_target
from monitor.reports import ledger
from monitor.reports.context import load_analysis_report
from monitor.reports.immediate import alert_hectares_sql, still_alerts
from monitor.reports.links import analysis_page_url
from monitor.reports.transport import DeliveryError

log = logging.getLogger(__name__)
SKIP_DISABLED = "webhook disabled"
EVENT_TYPE = "alert.created"
USER_AGENT = "UniRS-Monitor-Webhooks/1"


class WebhookError(ValueError):
    """An endpoint that cannot be added or changed; the message is one line saying why."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def add_endpoint(session: Session, area: Area, url: str, webhooks: WebhookSettings,
                 description: str | None = None) -> WebhookEndpoint:
    """A new endpoint of ``area`` (its ``secret`` is readable only now). :class:`WebhookError` if the URL
    is refused by the SSRF policy or already registered for the area."""
    try:
        check_webhook_url(url, webhooks)
    except HrefRefused as exc:
        raise WebhookError(str(exc)) from None
    if session.scalar(select(WebhookEndpoint.id).where(WebhookEndpoint.area_id == area.id,
                                                       WebhookEndpoint.url == url)):
        raise WebhookError(f"area {area.name!r} already has the webhook {url}")
    endpoint = WebhookEndpoint(area_id=area.id, url=url, secret=new_secret(), enabled=True,
                               description=(description or None) and description[:500])
    session.add(endpoint)
    session.flush()
    log.info("webhook %s added to area %r: %s", endpoint.id, area.name, url)
    return endpoint


def set_enabled(session: Session, endpoint: WebhookEndpoint, enabled: bool) -> bool:
    """Enable or disable ``endpoint``; True if that changed it. Events of a disabled endpoint are skipped."""
    if endpoint.enabled == enabled:
        return False
    endpoint.enabled = enabled
    session.flush()
    log.info("webhook %s %s", endpoint.id, "enabled" if enabled else "disabled")
    return True


def skip_if_disabled(session: Session, delivery_id: int) -> bool:
    """pending → skipped (reason ``webhook disabled``) if the event's endpoint is disabled."""
    done = session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.status == DeliveryStatus.PENDING,
               Delivery.webhook_id.in_(select(WebhookEndpoint.id).where(WebhookEndpoint.enabled.is_(False))))
        .values(status=DeliveryStatus.SKIPPED, skip_reason=SKIP_DISABLED, next_attempt_at=None)
        .returning(Delivery.id)
    ).one_or_none()
    return done is not None


def endpoint_view(endpoint: WebhookEndpoint, secret: bool = False) -> dict[str, Any]:
    """The JSON shape of an endpoint in the API and CLI (the secret only when just created)."""
    view = {"id": endpoint.id, "area_id": endpoint.area_id, "url": endpoint.url, "description": endpoint.description,
            "enabled": endpoint.enabled, "created_at": endpoint.created_at.isoformat() if endpoint.created_at else None}
    if secret:
        view["secret"] = endpoint.secret
    return view


# --- which events ----------------------------------------------------------------------------------


def create_webhook_deliveries(session: Session, now: datetime, settings: Settings) -> int:
    """Queue an event per (alerting analysis, endpoint of its area); those of disabled endpoints are skipped
    when due (:func:`skip_if_disabled`), not sent. Returns rows created."""
    alerting = alert_hectares_sql()
    since = now - timedelta(days=settings.reports.immediate_lookback_days)
    has_endpoint = exists().where(WebhookEndpoint.area_id == Area.id)
    analyses = session.execute(
        select(Analysis.id, Analysis.area_id)
        .join(Area, Area.id == Analysis.area_id)
        .where(
            Analysis.status == AnalysisStatus.DONE,
            or_(func.coalesce(Analysis.finished_at, Analysis.created_at) >= since,
                exists().where(Finding.analysis_id == Analysis.id, Finding.kind == "region",
                               Finding.state_changed_at >= since)),
            Area.status == AreaStatus.ACTIVE,
            has_endpoint,
            ~exists().where(Delivery.analysis_id == Analysis.id, Delivery.webhook_id.is_not(None)),
            alerting > 0,
            alerting >= Area.min_alert_hectares,
        )
        .order_by(Analysis.id)
    ).all()
    created = 0
    for k, (analysis_id, area_id) in enumerate(analyses):
        if k and not still_alerts(session, analysis_id):
            continue  # an earlier analysis of this run alerted the same change
        endpoints = session.scalars(select(WebhookEndpoint.id).where(WebhookEndpoint.area_id == area_id)).all()
        created += ledger.insert_deliveries(session, [
            ledger.NewDelivery(f"analysis:{analysis_id}", f"webhook:{eid}", analysis_id=analysis_id, webhook_id=eid)
            for eid in endpoints
        ])
    if created:
        log.info("%d webhook event(s) queued for %d analyses", created, len(analyses))
    return created


def webhook_id_of(message_id: str) -> str:
    """The ``webhook-id`` of a delivery: its deterministic Message-ID without the mail decoration."""
    return "msg_" + message_id.strip("<>").split("@", 1)[0].removeprefix("delivery-")


def event_body(session: Session, analysis_id: int, settings: Settings) -> bytes:
    """The JSON event about one analysis (the same facts as the email, without images)."""
    r = load_analysis_report(session, analysis_id, settings.public_url, with_images=False)

    def scene(s) -> dict[str, Any] | None:
        return None if s is None else {"item_id": s.item_id, "collection": s.collection, "platform": s.platform,
                                       "tile": s.tile, "acquired_at": s.acquired_at.isoformat(),
                                       "cloud_cover": s.cloud_cover, "clear_fraction": s.clear_fraction}

    event = {
        "type": EVENT_TYPE,
        "timestamp": (r.finished_at or datetime.now(UTC)).isoformat(),
        "data": {
            "analysis_id": r.analysis_id, "area": {"id": r.area_id, "name": r.area_name},
            "headline": r.headline, "alert_hectares": r.alert_hectares, "total_hectares": r.total_hectares,
            "alert_on": r.alert_on, "alert_states": r.alert_states, "caption": r.caption, "confidence": r.confidence,
            "analyser": f"{r.analyser_name}@{r.analyser_version}", "after": scene(r.after), "before": scene(r.before),
            "pair_reason": r.pair_reason,
            "classes": [{"change_class": c.change_class, "regions": c.regions, "hectares": c.hectares,
                         "alerts": c.alerts, "watched": c.watched} for c in r.classes],
            "url": analysis_page_url(settings.web, r.analysis_id), "regions": r.regions_geojson,
        },
    }
    return json.dumps(event, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


# --- sending ---------------------------------------------------------------------------------------


def _connect(addresses: list[str], port: int, timeout: float) -> socket.socket:
    """The first of the checked addresses that accepts the connection (never a fresh DNS answer: no
    rebinding window between the policy check and the request)."""
    error: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout)
        except OSError as exc:
            error = exc
    raise error or OSError("no address to connect to")


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to the checked addresses; the certificate is still verified against the URL's host name."""

    def __init__(self, addresses: list[str], host: str, port: int, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.addresses = addresses

    def connect(self) -> None:
        self.sock = self._context.wrap_socket(_connect(self.addresses, self.port, self.timeout),
                                              server_hostname=self.host)


class _PinnedHTTP(http.client.HTTPConnection):
    """Plain HTTP (only where ``webhooks.allowed_schemes`` has it), pinned like :class:`_PinnedHTTPS`."""

    def __init__(self, addresses: list[str], host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.addresses = addresses

    def connect(self) -> None:
        self.sock = _connect(self.addresses, self.port, self.timeout)


class WebhookTransport:
    """POSTs with http.client: no proxies from the environment and no redirects (nothing follows them)."""

    name = "webhooks"

    def __init__(self, webhooks: WebhookSettings) -> None:
        self.settings = webhooks
        self.context = ssl.create_default_context(cafile=str(webhooks.ca_file) if webhooks.ca_file else None)

    def post(self, url: str, secret: str, webhook_id: str, body: bytes) -> int:
        """One signed POST; the HTTP status on 2xx, else :class:`DeliveryError` (permanent or not)."""
        try:
            url, addresses = webhook_target(url, self.settings)
        except HrefRefused as exc:
            raise DeliveryError(f"refused by the webhook URL policy: {exc}", permanent=True) from None
        parts = urlsplit(url)
        https = parts.scheme.lower() == "https"
        port, timeout = parts.port or (443 if https else 80), self.settings.timeout_seconds
        stamp = datetime.now(UTC)
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "webhook-id": webhook_id,
                   "webhook-timestamp": str(int(stamp.timestamp())),
                   "webhook-signature": Webhook(secret).sign(webhook_id, stamp, body.decode())}
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn = (_PinnedHTTPS(addresses, parts.hostname, port, timeout, self.context) if https
                else _PinnedHTTP(addresses, parts.hostname, port, timeout))
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            code, reason = resp.status, resp.reason
        except (OSError, http.client.HTTPException) as exc:
            raise DeliveryError(f"unreachable: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        if 200 <= code < 300:
            return code
        retry = code in (408, 429) or code >= 500
        hint = " (redirects are not followed; register the final URL)" if 300 <= code < 400 else ""
        raise DeliveryError(f"HTTP {code} {reason}{hint}", permanent=not retry)


def _prepare(session: Session, delivery_id: int, settings: Settings) -> tuple[str, str, bytes] | None:
    delivery = session.get(Delivery, delivery_id)
    if delivery is None or delivery.status != DeliveryStatus.PENDING or delivery.webhook_id is None:
        return None
    endpoint = session.get(WebhookEndpoint, delivery.webhook_id)
    return endpoint.url, endpoint.secret, event_body(session, delivery.analysis_id, settings)


def send_due_webhooks(now: datetime, settings: Settings, limit: int = 200) -> Counter[str]:
    """Settle dead senders' claims, then POST every due event. Counts for the run's summary."""
    counts: Counter[str] = Counter()
    transport, policy = WebhookTransport(settings.webhooks), settings.webhooks
    with session_scope(settings) as session:
        for stale in ledger.stale_sending(session, now, webhooks=True):
            outcome = ledger.resolve_stale(session, stale, None, now, policy, resend_unknown=True)
            counts[f"webhooks_recovered_{outcome}"] += 1
        ids = ledger.due_ids(session, now, limit, webhooks=True)
    for delivery_id in ids:
        with session_scope(settings) as session:
            if skip_if_disabled(session, delivery_id):
                counts["webhooks_disabled"] += 1
                continue
            prepared = _prepare(session, delivery_id, settings)
        if prepared is None:
            continue
        url, secret, body = prepared
        with session_scope(settings) as session:
            claim = ledger.claim(session, delivery_id, now, policy.lease_seconds)
        if claim is None:
            continue
        try:
            transport.post(url, secret, webhook_id_of(claim.message_id), body)
        except DeliveryError as exc:
            with session_scope(settings) as session:
                status = ledger.record_failure(session, claim.id, claim.attempts, exc.reason, exc.permanent, now,
                                               policy)
            counts["webhooks_failed" if status == "failed" else "webhooks_retry"] += 1
            log.warning("webhook event %s to %s (attempt %d): %s → %s", claim.id, url, claim.attempts, exc.reason,
                        status)
            continue
        with session_scope(settings) as session:
            ledger.mark_sent(session, claim.id, datetime.now(UTC))
        counts["webhooks_sent"] += 1
        log.info("webhook event %s (%s) delivered to %s", claim.id, claim.delivery_key, url)
    return counts
