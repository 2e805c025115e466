"""Browser login and logout (session cookie + CSRF-protected form), rate-limited, and self-service tokens.

The rate limit is kept in the database (``login_failures``), so it holds across replicas: more than
``web.login_max_failures`` failures for one e-mail address or one client address within
``web.login_window_minutes`` answer 429 until the window has passed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, Field
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.models import LoginFailure, User
from monitor import accounts
from web.deps import DB, Principal, check_csrf, principal, session_stamp, settings_of
from web.templating import render

router = APIRouter()


def _keys(request: Request, email: str) -> list[str]:
    client = request.client.host if request.client else "unknown"
    return [f"email:{email.strip().lower()[:320]}", f"ip:{client}"]


def _limited(session: Session, keys: list[str], request: Request) -> bool:
    web = settings_of(request).web
    since = datetime.now(UTC) - timedelta(minutes=web.login_window_minutes)
    failures = session.scalar(
        select(func.count()).select_from(LoginFailure).where(LoginFailure.key.in_(keys), LoginFailure.at >= since)
        .group_by(LoginFailure.key).order_by(func.count().desc()).limit(1)
    )
    return (failures or 0) >= web.login_max_failures


@router.get("/login", include_in_schema=False)
def login_page(request: Request, next: str = "/"):
    return render(request, "login.html", {"next": _safe_next(next), "error": None})


def _safe_next(target: str) -> str:
    """Only same-site paths: an open redirect after login would be a phishing aid."""
    return target if target.startswith("/") and not target.startswith(("//", "/\\")) else "/"


@router.post("/login", include_in_schema=False)
def login(request: Request, email: Annotated[str, Form()], password: Annotated[str, Form()],
          csrf: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/", session: Session = DB):
    check_csrf(request, csrf)
    keys = _keys(request, email)
    if _limited(session, keys, request):
        raise HTTPException(429, "too many failed logins; try again later", headers={"Retry-After": "900"})
    user = accounts.check_password(session, email, password)
    if user is None:
        session.add_all([LoginFailure(key=k) for k in keys])
        session.commit()
        return render(request, "login.html", {"next": _safe_next(next), "error": "wrong e-mail address or password"},
                      status_code=401)
    session.execute(delete(LoginFailure).where(LoginFailure.key == keys[0]))
    request.session.clear()  # a new session id for the new identity (no fixation)
    request.session.update({"uid": user.id, "email": user.email, "stamp": session_stamp(user)})
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout", include_in_schema=False)
def logout(request: Request, csrf: Annotated[str, Form()] = ""):
    check_csrf(request, csrf)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


class TokenRequest(BaseModel):
    name: str = Field("api", max_length=100)
    scopes: list[str] = ["read", "write"]


@router.post("/api/tokens", status_code=201, tags=["accounts"])
def create_token(body: TokenRequest, who: Principal = Depends(principal), session: Session = DB):
    """Issue an API token for yourself. The token is in this answer only; only its hash is stored."""
    user = session.get(User, who.user_id)
    try:
        token = accounts.issue_token(session, user, body.name, body.scopes)
    except accounts.AccountError as exc:
        raise HTTPException(422, str(exc)) from None
    return {"token": token, "name": body.name, "scopes": sorted(set(body.scopes))}


@router.get("/api/me", tags=["accounts"])
def me(who: Principal = Depends(principal)):
    return {"id": who.user_id, "email": who.email, "admin": who.is_admin, "scopes": sorted(who.scopes), "via": who.via}
