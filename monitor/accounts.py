"""Accounts of the web app and API: users, passwords and API tokens (the CLI and web/ both use this).

Passwords and tokens are stored as argon2id hashes (pwdlib's recommended ``PasswordHash``, RFC 9106
parameters). A token is ``unirs_<prefix>_<secret>``: the prefix (12 hex digits, stored in clear, UNIQUE)
finds its row, the hash of the whole token proves it; the token itself is shown once and never stored.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

from email_validator import EmailNotValidError, validate_email
from pwdlib import PasswordHash
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import OPERATOR_EMAIL, ApiToken, User
from monitor.choices import TOKEN_SCOPES

SCOPES = TOKEN_SCOPES
MIN_PASSWORD = 10
_HASH = PasswordHash.recommended()
_TOKEN = re.compile(r"^unirs_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
# Verified when the e-mail address is unknown, so a wrong address costs as long as a wrong password.
_DUMMY = _HASH.hash("not a password of anybody")


class AccountError(ValueError):
    """A request about accounts that cannot be carried out; the message says why."""


def normalise_email(email: str) -> str:
    if not isinstance(email, str) or any(c in email for c in "\r\n\x00"):
        raise AccountError(f"{email!r} is not a valid e-mail address")
    email = email.strip().lower()
    if email == OPERATOR_EMAIL:
        return email
    try:
        return validate_email(email, check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise AccountError(f"{email!r} is not a valid e-mail address: {exc}") from None


def get_user(session: Session, email: str) -> User | None:
    return session.scalar(select(User).where(User.email == normalise_email(email)))


def create_user(session: Session, email: str, *, name: str | None = None, password: str | None = None,
                admin: bool = False) -> User:
    """A new account; AccountError if the address is taken or invalid, or the password too short."""
    email = normalise_email(email)
    if session.scalar(select(User.id).where(User.email == email)) is not None:
        raise AccountError(f"a user {email} already exists")
    user = User(email=email, name=name, is_admin=admin)
    if password is not None:
        user.password_hash = hash_password(password)
    session.add(user)
    session.flush()
    return user


def hash_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise AccountError(f"a password needs at least {MIN_PASSWORD} characters")
    return _HASH.hash(password)


def check_password(session: Session, email: str, password: str) -> User | None:
    """The user whose address and password these are, else None (same work either way)."""
    try:
        user = get_user(session, email)
    except AccountError:
        user = None
    if user is None or user.password_hash is None:
        _HASH.verify(password or "", _DUMMY)
        return None
    valid, new_hash = _HASH.verify_and_update(password or "", user.password_hash)
    if not valid:
        return None
    if new_hash:  # parameters got stronger since it was hashed
        user.password_hash = new_hash
    return user


def issue_token(session: Session, user: User, name: str, scopes: list[str] | tuple[str, ...]) -> str:
    """Create a token for ``user``; returns the token text, which is not kept anywhere."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise AccountError(f"token scopes must be among {list(SCOPES)}, got {list(scopes)}")
    prefix = secrets.token_hex(6)
    token = f"unirs_{prefix}_{secrets.token_urlsafe(32)}"
    session.add(ApiToken(user_id=user.id, name=name or "token", prefix=prefix, token_hash=_HASH.hash(token),
                         scopes=sorted(set(scopes))))
    session.flush()
    return token


def authenticate_token(session: Session, token: str) -> tuple[User, ApiToken] | None:
    """The user and token row of a valid, unrevoked token, else None."""
    match = _TOKEN.match(token or "")
    if not match:
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.prefix == match.group(1), ApiToken.revoked_at.is_(None)))
    if row is None or not _HASH.verify(token, row.token_hash):
        return None
    row.last_used_at = datetime.now(UTC)
    return session.get(User, row.user_id), row


def revoke_token(session: Session, prefix: str) -> bool:
    row = session.scalar(select(ApiToken).where(ApiToken.prefix == prefix, ApiToken.revoked_at.is_(None)))
    if row is None:
        return False
    row.revoked_at = datetime.now(UTC)
    return True
