"""One-click unsubscribe (RFC 8058) from an area's emails, reached from the link and headers of every email.

``GET /unsubscribe?token=…`` shows a confirmation page with one button; ``POST /unsubscribe?token=…`` (that
button, or a mail provider acting on ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``) records the
unsubscribe. The signed token is the credential (RFC 8058 §3.2: no cookie, no login, no CSRF token can be
expected from a mail provider's POST); it names (area, recipient) without the address
(:mod:`monitor.reports.links`). ``POST /unsubscribe/undo?token=…`` subscribes again.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from sqlalchemy.orm import Session

from monitor.reports import links
from web.deps import DB, settings_of
from web.templating import render

router = APIRouter(include_in_schema=False)


def masked(address: str) -> str:
    """``a•••@example.org``: enough to recognise one's own address, not to harvest it from a forwarded link."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}•••@{domain}" if domain else "•••"


def _page(request: Request, token: str, session: Session, action: str | None = None):
    secret = settings_of(request).web.secret
    try:
        if not secret:
            raise links.InvalidToken("unsubscribe links are not enabled on this server (no web.secret)")
        area, recipient = links.resolve_token(session, secret, token)
    except links.InvalidToken as exc:
        return render(request, "unsubscribe.html", {"error": str(exc), "token": token}, status_code=400)
    if action == "unsubscribe":
        links.unsubscribe(session, area.id, recipient)
    elif action == "undo":
        links.resubscribe(session, area.id, recipient)
    session.commit()
    return render(request, "unsubscribe.html", {
        "error": None, "token": token, "area_name": area.name, "recipient": masked(recipient), "action": action,
        "unsubscribed": links.is_unsubscribed(session, area.id, recipient),
    })


@router.get("/unsubscribe")
def confirm(request: Request, token: str = Query("", max_length=400), session: Session = DB):
    return _page(request, token, session)


@router.post("/unsubscribe")
def one_click(request: Request, token: str = Query("", max_length=400), session: Session = DB):
    return _page(request, token, session, "unsubscribe")


@router.post("/unsubscribe/undo")
def undo(request: Request, token: str = Query("", max_length=400), session: Session = DB):
    return _page(request, token, session, "undo")
