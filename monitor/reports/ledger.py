"""The deliveries ledger: one row per (analysis or digest, recipient), and every state change of it.

States: ``pending → sending → sent``, or back to ``pending`` with a later ``next_attempt_at`` after a
transient failure, or ``failed`` (with ``last_error``; ``permanent_failure`` when the server said 5xx).

While a row is ``sending``, ``next_attempt_at`` holds the *lease expiry* of the claim: no extra column
is needed and a due-query on (status, next_attempt_at) serves both uses from one index.

Exactly once — the choice, and why
----------------------------------
A delivery is claimed (pending → sending, ``SELECT … FOR UPDATE SKIP LOCKED`` so concurrent runners
never take the same row) and that claim is *committed before* the SMTP conversation starts; the row is
marked ``sent`` right after the server accepts the message. The message is rendered before the claim,
so the claimed window covers the SMTP conversation only.

If the process dies inside that window, nobody can know whether the server accepted the message. Such a
row is found when its lease expires (:func:`recover_stale`) and resolved **at most once**:

- the outbox transport *can* know (a message exists iff its ``.eml`` file, named from the Message-ID and
  written atomically, exists): found → ``sent``; absent → ``pending`` again, which cannot duplicate;
- SMTP cannot: the row becomes ``failed`` with ``last_error`` saying the outcome is unknown. It is not
  resent automatically, because the issue's rule is "never two emails"; an operator who checks the mail
  log can :func:`requeue` it, and the resend carries the same deterministic Message-ID, so clients and
  archives that deduplicate by Message-ID still show one message.

The price is that a crash in that short window may lose one email (visible in the ledger, never silent)
instead of sending it twice.

Webhook events (rows with ``webhook_id``) use the same rows, claims and leases; only the unknown outcome
is settled the other way: the event is sent again with the same ``webhook-id``, which Standard Webhooks
receivers use to drop duplicates, so a crash costs a repeated request, never a lost event.

A row can also end ``skipped`` without being sent (``skip_reason``: the recipient unsubscribed).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core.config import SmtpSettings, WebhookSettings
from core.models import Delivery, DeliveryStatus, WebhookEndpoint

log = logging.getLogger(__name__)


# The last_error of a delivery whose outcome is unknown (see resolve_stale) starts with this.
UNKNOWN_PREFIX = "outcome unknown:"


@dataclass(frozen=True)
class NewDelivery:
    delivery_key: str  # "analysis:<id>" | "digest:<id>"
    recipient: str
    analysis_id: int | None = None
    digest_id: int | None = None
    webhook_id: int | None = None


@dataclass(frozen=True)
class Claim:
    id: int
    attempts: int
    recipient: str
    message_id: str
    delivery_key: str


def message_id_for(delivery_key: str, recipient: str) -> str:
    """Deterministic: a resend of the same delivery is recognisably the same message."""
    digest = hashlib.sha256(f"{delivery_key}\n{recipient}".encode()).hexdigest()[:24]
    return f"<delivery-{digest}@unirs-monitor>"


Retry = SmtpSettings | WebhookSettings  # max_attempts, retry_base_seconds, retry_max_seconds


def backoff(attempts: int, smtp: Retry) -> timedelta:
    """Wait before attempt ``attempts + 1``: base × 2^(attempts − 1), capped."""
    seconds = smtp.retry_base_seconds * 2 ** max(attempts - 1, 0)
    return timedelta(seconds=min(seconds, smtp.retry_max_seconds))


def insert_deliveries(session: Session, rows: list[NewDelivery]) -> int:
    """INSERT … ON CONFLICT DO NOTHING: concurrent or repeated runs cannot create a second row."""
    if not rows:
        return 0
    stmt = (
        insert(Delivery)
        .values([
            {
                "delivery_key": r.delivery_key,
                "analysis_id": r.analysis_id,
                "digest_id": r.digest_id,
                "webhook_id": r.webhook_id,
                "recipient": r.recipient,
                "status": DeliveryStatus.PENDING,
                "attempts": 0,
                "message_id": message_id_for(r.delivery_key, r.recipient),
                "permanent_failure": False,
            }
            for r in rows
        ])
        .on_conflict_do_nothing(constraint="uq_deliveries_key_recipient")
        .returning(Delivery.id)
    )
    return len(session.execute(stmt).all())


def _due(now: datetime):
    return (Delivery.status == DeliveryStatus.PENDING) & or_(
        Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now
    )


def _channel(webhooks: bool):
    return Delivery.webhook_id.is_not(None) if webhooks else Delivery.webhook_id.is_(None)


def due_ids(session: Session, now: datetime, limit: int, webhooks: bool = False) -> list[int]:
    """Pending emails (or webhook events) whose time has come, oldest first (no lock: each is claimed on
    its own)."""
    stmt = (select(Delivery.id).where(_due(now), _channel(webhooks)).order_by(Delivery.created_at, Delivery.id)
            .limit(limit))
    return list(session.scalars(stmt))


def claim(session: Session, delivery_id: int, now: datetime, lease_seconds: float) -> Claim | None:
    """pending → sending with a lease; None if another runner holds or already took it."""
    target = (
        select(Delivery.id)
        .where(Delivery.id == delivery_id, _due(now))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    row = session.execute(
        update(Delivery)
        .where(Delivery.id == target)
        .values(
            status=DeliveryStatus.SENDING,
            attempts=Delivery.attempts + 1,
            # The lease runs from the claim itself: ``now`` may be the start of a long run.
            next_attempt_at=max(now, datetime.now(UTC)) + timedelta(seconds=lease_seconds),
        )
        .returning(Delivery.id, Delivery.attempts, Delivery.recipient, Delivery.message_id, Delivery.delivery_key)
    ).one_or_none()
    return Claim(*row) if row else None


def mark_sent(session: Session, delivery_id: int, now: datetime) -> None:
    # Accepted by the server is the truth, even if a recovery already gave this row up as unknown.
    session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.status != DeliveryStatus.SENT)
        .values(status=DeliveryStatus.SENT, sent_at=now, next_attempt_at=None, last_error=None,
                permanent_failure=False)
    )


def record_failure(
    session: Session,
    delivery_id: int,
    attempts: int,
    reason: str,
    permanent: bool,
    now: datetime,
    smtp: Retry,
    from_status: DeliveryStatus = DeliveryStatus.SENDING,
) -> str:
    """Retry later, or give up. Returns the new status ("pending" or "failed")."""
    if permanent:
        values = {"status": DeliveryStatus.FAILED, "permanent_failure": True, "next_attempt_at": None,
                  "last_error": reason}
    elif attempts >= smtp.max_attempts:
        values = {"status": DeliveryStatus.FAILED, "permanent_failure": False, "next_attempt_at": None,
                  "last_error": f"gave up after {attempts} attempts; last error: {reason}"}
    else:
        values = {"status": DeliveryStatus.PENDING, "next_attempt_at": now + backoff(attempts, smtp),
                  "last_error": reason}
    if from_status == DeliveryStatus.PENDING:  # failed before it was claimed (rendering): count the attempt
        values["attempts"] = attempts
    session.execute(
        update(Delivery).where(Delivery.id == delivery_id, Delivery.status == from_status).values(**values)
    )
    return values["status"].value


def stale_sending(session: Session, now: datetime, limit: int = 100, webhooks: bool = False) -> list[Claim]:
    """Rows whose claim expired: the worker that held them died (or hung) mid-send. Locked for the caller."""
    stmt = (
        select(Delivery.id, Delivery.attempts, Delivery.recipient, Delivery.message_id, Delivery.delivery_key)
        .where(Delivery.status == DeliveryStatus.SENDING, Delivery.next_attempt_at < now, _channel(webhooks))
        .order_by(Delivery.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [Claim(*row) for row in session.execute(stmt).all()]


def resolve_stale(session: Session, stale: Claim, delivered: bool | None, now: datetime, smtp: Retry,
                  resend_unknown: bool = False) -> str:
    """Settle one expired claim from what the transport knows (see the module docstring).
    ``resend_unknown``: the receiver deduplicates by message id (webhooks), so an unknown outcome is sent
    again rather than given up."""
    if delivered is None and resend_unknown:
        status = DeliveryStatus.PENDING if stale.attempts < smtp.max_attempts else DeliveryStatus.FAILED
        session.execute(
            update(Delivery)
            .where(Delivery.id == stale.id, Delivery.status == DeliveryStatus.SENDING)
            .values(status=status, next_attempt_at=now if status == DeliveryStatus.PENDING else None,
                    last_error="the sender died during the request; "
                    + ("sending again with the same id" if status == DeliveryStatus.PENDING else "no attempts left"))
        )
        log.warning("delivery %s to %s: sender died mid-request; %s", stale.id, stale.recipient, status.value)
        return "resent" if status == DeliveryStatus.PENDING else status.value
    if delivered is True:
        mark_sent(session, stale.id, now)
        log.warning("delivery %s to %s: sending worker died after writing it; marked sent", stale.id, stale.recipient)
        return "sent"
    if delivered is False:
        status = DeliveryStatus.PENDING if stale.attempts < smtp.max_attempts else DeliveryStatus.FAILED
        session.execute(
            update(Delivery)
            .where(Delivery.id == stale.id, Delivery.status == DeliveryStatus.SENDING)
            .values(status=status, next_attempt_at=now if status == DeliveryStatus.PENDING else None,
                    last_error="the sending worker died before the message was written; "
                    + ("sending again" if status == DeliveryStatus.PENDING else "no attempts left"))
        )
        log.warning("delivery %s to %s: sending worker died before writing it; %s", stale.id, stale.recipient,
                    "requeued" if status == DeliveryStatus.PENDING else "failed (no attempts left)")
        return status.value
    session.execute(
        update(Delivery)
        .where(Delivery.id == stale.id, Delivery.status == DeliveryStatus.SENDING)
        .values(
            status=DeliveryStatus.FAILED,
            permanent_failure=False,
            next_attempt_at=None,
            last_error=(
                f"{UNKNOWN_PREFIX} the worker sending this message died during the SMTP conversation; not resent "
                "so that nobody receives it twice (check the mail server log, then requeue it if it never left)"
            ),
        )
    )
    log.error("delivery %s to %s (%s): sending worker died mid-conversation; outcome unknown, marked failed "
              "rather than risk a duplicate", stale.id, stale.recipient, stale.message_id)
    return "unknown"


def requeue(session: Session, delivery_id: int) -> bool:
    """Operator action: send a failed delivery again (same Message-ID). True if the row was failed."""
    result = session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.status == DeliveryStatus.FAILED)
        .values(status=DeliveryStatus.PENDING, next_attempt_at=None, permanent_failure=False, attempts=0)
        .returning(Delivery.id)
    ).one_or_none()
    if result:
        log.info("delivery %s requeued by an operator", delivery_id)
    return result is not None


# --- what needs an operator -------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A delivery that did not reach its recipient: ``kind`` is ``unknown`` (the sender died mid-SMTP)
    or ``failed`` (rejected, or out of attempts)."""

    id: int
    delivery_key: str
    recipient: str
    kind: str
    attempts: int
    last_error: str | None
    created_at: datetime
    channel: str = "email"  # or "webhook"
    target: str = ""  # for a reader: the address, or "webhook N at HOST" (never the URL: it may hold a token)


def is_unknown():
    """SQL condition: failed with an unknown outcome."""
    return (Delivery.status == DeliveryStatus.FAILED) & Delivery.last_error.startswith(UNKNOWN_PREFIX)


def problems(session: Session, *, unknown_only: bool = False, area_id: int | None = None,
             limit: int = 100) -> list[Problem]:
    """Failed deliveries, oldest first (only the unknown-outcome ones with ``unknown_only``), optionally of
    one area (its alerts and its digests)."""
    from core.models import Analysis, Digest

    query = select(Delivery).where(is_unknown() if unknown_only else Delivery.status == DeliveryStatus.FAILED)
    if area_id is not None:
        query = query.where(or_(
            Delivery.analysis_id.in_(select(Analysis.id).where(Analysis.area_id == area_id)),
            Delivery.digest_id.in_(select(Digest.id).where(Digest.area_id == area_id)),
        ))
    rows = session.execute(query.add_columns(WebhookEndpoint.url)
                           .outerjoin(WebhookEndpoint, WebhookEndpoint.id == Delivery.webhook_id)
                           .order_by(Delivery.created_at, Delivery.id).limit(limit)).all()
    out = []
    for d, url in rows:
        kind = "unknown" if (d.last_error or "").startswith(UNKNOWN_PREFIX) else "failed"
        if d.webhook_id is None:
            out.append(Problem(d.id, d.delivery_key, d.recipient, kind, d.attempts, d.last_error, d.created_at,
                               "email", d.recipient))
            continue
        host = webhook_host(url)
        out.append(Problem(d.id, d.delivery_key, d.recipient, kind, d.attempts, _hide_urls(d.last_error, url, host),
                           d.created_at, "webhook", f"webhook {d.webhook_id} at {host}"))
    return out


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def webhook_host(url: str | None) -> str:
    """The host of a webhook URL, all a report shows of it (paths and queries often carry tokens)."""
    try:
        return (urlsplit(url or "").hostname or "unknown host").lower()
    except ValueError:
        return "unknown host"


def _hide_urls(error: str | None, url: str | None, host: str) -> str | None:
    """``error`` with the endpoint's URL, and any other URL in it, cut to scheme and host."""
    if not error:
        return error
    if url:
        error = error.replace(url, f"{urlsplit(url).scheme}://{host}/…")
    return _URL.sub(lambda m: m[0] if m[0].endswith("/…") else f"{m[0].split('://', 1)[0]}://"
                    f"{webhook_host(m[0])}/…", error)
