"""Web links in emails: the analysis page, "manage alerts", and signed one-click unsubscribe (RFC 8058).

Links exist only when the web app is configured (``web.public_url`` and a shared ``web.secret``: the
scheduler that sends the email and the web replica that receives the click must agree on the key).

An unsubscribe token is ``itsdangerous``-signed ``[area_id, recipient digest]``; the digest is an HMAC of
the address under the same secret, so neither the URL nor the ``List-Unsubscribe`` header carries the
address itself. The web app finds the recipient by comparing the digest with the area's recipients. The
token does not expire: RFC 8058 mail providers may POST it long after the message arrived.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import exists, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core.config import WebSettings
from core.models import Analysis, Area, Delivery, Digest, Unsubscribe

SALT = "unirs-unsubscribe"
SKIP_UNSUBSCRIBED = "unsubscribed"


class InvalidToken(ValueError):
    """An unsubscribe token that was not signed by this deployment, or names nothing that exists."""


@dataclass(frozen=True)
class EmailLinks:
    unsubscribe_url: str  # GET: a confirmation page; POST (RFC 8058 one-click): unsubscribes
    manage_url: str  # the area's page in the web app (needs a login)
    headers: dict[str, str] = field(default_factory=dict)  # List-Unsubscribe + List-Unsubscribe-Post


def _digest(secret: str, area_id: int, recipient: str) -> str:
    msg = f"unsubscribe\n{area_id}\n{recipient.strip().lower()}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()[:32]


def unsubscribe_token(secret: str, area_id: int, recipient: str) -> str:
    """URL-safe token naming (area, recipient) without containing the address."""
    return URLSafeSerializer(secret, salt=SALT).dumps([area_id, _digest(secret, area_id, recipient)])


def resolve_token(session: Session, secret: str, token: str) -> tuple[Area, str]:
    """(area, recipient address) of a token; :class:`InvalidToken` if forged, or the area or the recipient
    is gone."""
    try:
        area_id, digest = URLSafeSerializer(secret, salt=SALT).loads(token)
        area_id = int(area_id)
    except (BadSignature, TypeError, ValueError):
        raise InvalidToken("this unsubscribe link is not valid (was it cut short?)") from None
    area = session.get(Area, area_id)
    if area is not None:
        for recipient in area.recipients or []:
            if hmac.compare_digest(_digest(secret, area_id, recipient), str(digest)):
                return area, recipient.strip().lower()
    raise InvalidToken("this unsubscribe link names an area or recipient that no longer exists")


def page_base(web: WebSettings) -> str | None:
    return web.public_url.rstrip("/") if web.public_url else None


def analysis_page_url(web: WebSettings, analysis_id: int) -> str | None:
    """The analysis page of the web app (before/after, regions, caption), or None without a public URL."""
    base = page_base(web)
    return f"{base}/analyses/{analysis_id}" if base else None


def email_links(web: WebSettings, area_id: int, recipient: str) -> EmailLinks | None:
    """The footer links and headers of an email to ``recipient`` about ``area_id``; None unless the web app
    has a public URL and a shared secret."""
    base = page_base(web)
    if not base or not web.secret:
        return None
    url = f"{base}/unsubscribe?token={unsubscribe_token(web.secret, area_id, recipient)}"
    return EmailLinks(
        unsubscribe_url=url,
        manage_url=f"{base}/areas/{area_id}",
        headers={"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
    )


def unsubscribe(session: Session, area_id: int, recipient: str) -> bool:
    """Record that ``recipient`` wants nothing more about the area. True if newly recorded."""
    stmt = insert(Unsubscribe).values(area_id=area_id, recipient=recipient.strip().lower())
    return bool(session.execute(stmt.on_conflict_do_nothing().returning(Unsubscribe.area_id)).all())


def resubscribe(session: Session, area_id: int, recipient: str) -> bool:
    """Undo :func:`unsubscribe` (the recipient's own choice, from the confirmation page)."""
    row = session.get(Unsubscribe, (area_id, recipient.strip().lower()))
    if row is None:
        return False
    session.delete(row)
    return True


def is_unsubscribed(session: Session, area_id: int, recipient: str) -> bool:
    return session.get(Unsubscribe, (area_id, recipient.strip().lower())) is not None


def delivery_area_id(session: Session, delivery: Delivery) -> int | None:
    """The area an email delivery is about (through its analysis or digest)."""
    if delivery.analysis_id is not None:
        return session.scalar(select(Analysis.area_id).where(Analysis.id == delivery.analysis_id))
    if delivery.digest_id is not None:
        return session.scalar(select(Digest.area_id).where(Digest.id == delivery.digest_id))
    return None


def unsubscribed_sql():
    """SQL condition on ``Delivery``: its recipient unsubscribed from the delivery's area."""
    area_id = func.coalesce(
        select(Analysis.area_id).where(Analysis.id == Delivery.analysis_id).correlate(Delivery).scalar_subquery(),
        select(Digest.area_id).where(Digest.id == Delivery.digest_id).correlate(Delivery).scalar_subquery(),
    )
    return (exists().where(Unsubscribe.area_id == area_id, Unsubscribe.recipient == func.lower(Delivery.recipient))
            .correlate(Delivery))
