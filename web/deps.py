"""Who is asking, and may they: request dependencies shared by every route.

A request is authenticated by ``Authorization: Bearer unirs_…`` (an API token with scopes ``read`` /
``write``) or by the browser session cookie (both scopes; unsafe methods then need the CSRF token in the
``X-CSRF-Token`` header or a ``csrf`` form field). No credentials → 401. An area, analysis or finding
that exists but belongs to somebody else answers 404, exactly like one that does not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import session_scope
from core.models import Analysis, Area, Finding, User
from monitor import accounts

UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


@dataclass(frozen=True)
class Principal:
    user_id: int
    email: str
    is_admin: bool
    scopes: frozenset[str]
    via: str  # "token" | "session"


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def db(request: Request) -> Iterator[Session]:
    with session_scope(settings_of(request)) as session:
        yield session


# Routes take ``session: Session = DB``. scope="function" commits when the route returns, *before* the
# response is sent; FastAPI's default ("request") commits after it, so a client that creates an area and
# at once lists its areas (the map page does) could read the database before the commit and miss it.
DB = Depends(db, scope="function")


def csrf_token(request: Request) -> str:
    """The session's CSRF token (created on first use); forms and the page's fetch() calls send it back."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(24)
    return token


def check_csrf(request: Request, sent: str | None) -> None:
    expected = request.session.get("csrf")
    if not expected or not sent or not hmac.compare_digest(expected, sent):
        raise HTTPException(403, "missing or wrong CSRF token (reload the page)")


def session_stamp(user: User) -> str:
    """Changes when the password does, so changing it ends every other session of the account."""
    return hashlib.sha256(f"{user.id}:{user.password_hash or ''}".encode()).hexdigest()[:16]


def _unauthorised(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": 'Bearer realm="unirs"'})


def optional_principal(request: Request, session: Session = DB) -> Principal | None:
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        found = accounts.authenticate_token(session, token.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            raise _unauthorised("invalid or revoked API token")
        user, row = found
        return Principal(user.id, user.email, user.is_admin, frozenset(row.scopes), "token")
    uid = request.session.get("uid")
    if isinstance(uid, int):
        user = session.get(User, uid)
        if user is not None and hmac.compare_digest(str(request.session.get("stamp", "")), session_stamp(user)):
            return Principal(user.id, user.email, user.is_admin, frozenset(accounts.SCOPES), "session")
        request.session.clear()  # deleted user, or the password changed since this cookie was issued
    return None


def principal(request: Request, who: Principal | None = Depends(optional_principal)) -> Principal:
    """The authenticated caller (401 otherwise); unsafe methods need the ``write`` scope and, for browser
    sessions, the CSRF header."""
    if who is None:
        raise _unauthorised("authentication required: an API token (Authorization: Bearer …) or a login")
    if request.method in UNSAFE:
        if "write" not in who.scopes:
            raise HTTPException(403, "this token has no 'write' scope")
        if who.via == "session":
            check_csrf(request, request.headers.get("x-csrf-token"))
    return who


def owned(stmt, who: Principal):
    """Restrict a statement that involves ``Area`` to the caller's areas (admins see all)."""
    return stmt if who.is_admin else stmt.where(Area.owner_id == who.user_id)


def owned_area(session: Session, who: Principal, area_id: int) -> Area:
    area = session.scalar(owned(select(Area).where(Area.id == area_id), who))
    if area is None:
        raise HTTPException(404, f"no area {area_id}")
    return area


def owned_analysis(session: Session, who: Principal, analysis_id: int) -> Analysis:
    stmt = select(Analysis).join(Area, Area.id == Analysis.area_id).where(Analysis.id == analysis_id)
    row = session.scalar(owned(stmt, who))
    if row is None:
        raise HTTPException(404, f"no analysis {analysis_id}")
    return row


def owned_finding(session: Session, who: Principal, finding_id: int) -> Finding:
    stmt = select(Finding).join(Area, Area.id == Finding.area_id).where(Finding.id == finding_id)
    row = session.scalar(owned(stmt, who))
    if row is None:
        raise HTTPException(404, f"no finding {finding_id}")
    return row
