"""Getting a finished message to its recipient: an SMTP server, or an outbox directory of ``.eml`` files.

Failures are classified here, once, into :class:`DeliveryError`:

- ``permanent``: the server refused *this* message or recipient with a 5xx reply. Retrying cannot help.
- transient: 4xx replies, refused connections, timeouts, disconnects. Retried with backoff.
- ``unreachable``: the failure concerns the server, not the message (cannot connect, authentication or
  sender refused: configuration). The runner stops its batch so one outage costs one attempt per run,
  not one per queued message. Authentication and sender refusals are 5xx but *not* permanent: failing
  every queued alert for good because a password expired would be worse than waiting for the fix.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import re
import smtplib
import ssl
from base64 import b64encode
from email import policy
from email.message import EmailMessage
from email.utils import parseaddr
from pathlib import Path
from typing import Protocol

from core.config import SmtpSettings

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    def __init__(self, reason: str, *, permanent: bool = False, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.unreachable = unreachable


class Transport(Protocol):
    name: str

    def send(self, message: EmailMessage, recipient: str) -> None: ...

    def was_delivered(self, message_id: str) -> bool | None:
        """True/False if this transport can tell whether the message went out; None if it cannot."""

    def close(self) -> None: ...


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {' '.join(text.split())}"


class SmtpTransport:
    """One connection reused for a whole run; dropped and reopened after any error."""

    name = "smtp"

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings
        self._conn: smtplib.SMTP | None = None
        sender = settings.from_address()
        self.envelope_sender = parseaddr(sender)[1] or sender

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        context = ssl.create_default_context()
        if s.ssl:
            conn: smtplib.SMTP = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout_seconds, context=context)
        else:
            conn = smtplib.SMTP(s.host, s.port, timeout=s.timeout_seconds)
        try:
            conn.ehlo()
            if s.starttls:
                conn.starttls(context=context)
                conn.ehlo()
            if s.username:
                conn.login(s.username, s.password or "")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        log.debug("connected to SMTP %s:%s", s.host, s.port)
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def send(self, message: EmailMessage, recipient: str) -> None:
        where = f"SMTP {self.settings.host}:{self.settings.port}"
        try:
            if self._conn is None:
                self._conn = self._connect()
            self._conn.send_message(message, from_addr=self.envelope_sender, to_addrs=[recipient])
        except smtplib.SMTPRecipientsRefused as exc:
            self._drop()
            code, text = exc.recipients.get(recipient, (450, b"recipient refused"))
            raise DeliveryError(f"{where} refused {recipient}: {_reply(code, text)}", permanent=code >= 500) from None
        except (smtplib.SMTPAuthenticationError, smtplib.SMTPSenderRefused, smtplib.SMTPHeloError) as exc:
            self._drop()
            raise DeliveryError(f"{where}: {type(exc).__name__}: {_reply(exc.smtp_code, exc.smtp_error)}",
                                unreachable=True) from None
        except smtplib.SMTPResponseException as exc:
            self._drop()
            raise DeliveryError(f"{where} rejected the message: {_reply(exc.smtp_code, exc.smtp_error)}",
                                permanent=exc.smtp_code >= 500) from None
        except (smtplib.SMTPException, OSError) as exc:  # refused, timeout, DNS, disconnect, TLS
            self._drop()
            raise DeliveryError(f"{where} unreachable: {type(exc).__name__}: {exc}", unreachable=True) from None

    def was_delivered(self, message_id: str) -> bool | None:
        return None  # an SMTP server cannot be asked whether it accepted a message

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.quit()
        self._drop()


def outbox_stem(message_id: str) -> str:
    """File name (without extension) of a message in the outbox: the Message-ID's local part."""
    local = message_id.strip().strip("<>").split("@", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]", "-", local) or "message"


def preview_html(message: EmailMessage) -> str:
    """The HTML part with ``cid:`` images replaced by data URIs, and the headers on top: for a browser."""
    html_part = message.get_body(preferencelist=("html",))
    if html_part is None:
        raise ValueError("message has no HTML part")
    body = html_part.get_content()
    for part in message.walk():
        cid = part.get("Content-ID")
        if cid and part.get_content_maintype() == "image":
            uri = f"data:{part.get_content_type()};base64,{b64encode(part.get_content()).decode('ascii')}"
            body = body.replace(f"cid:{cid.strip('<>')}", uri)
    attachments = [p.get_filename() for p in message.iter_attachments() if p.get_filename()]
    banner = (
        '<div style="font:13px/1.5 monospace;background:#fffbe6;border-bottom:1px solid #e5d38a;padding:8px 12px;">'
        + "".join(
            f"<div><b>{name}:</b> {html.escape(str(message.get(name, '')))}</div>"
            for name in ("Subject", "From", "To", "Date", "Message-ID")
        )
        + (f"<div><b>Attachments:</b> {html.escape(', '.join(attachments))}</div>" if attachments else "")
        + "</div>"
    )
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + banner, body, count=1)


class OutboxTransport:
    """Writes ``<stem>.eml`` (and ``<stem>.html``, a browser preview) into a directory.

    The ``.eml`` is written to a temporary name, flushed to disk and renamed: it exists completely or
    not at all, so its existence answers :meth:`was_delivered` after a crash.
    """

    name = "outbox"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, message_id: str) -> Path:
        return self.directory / f"{outbox_stem(message_id)}.eml"

    def send(self, message: EmailMessage, recipient: str) -> None:
        path = self._path(message["Message-ID"])
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".html").write_text(preview_html(message), encoding="utf-8")
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(message.as_bytes(policy=policy.SMTP))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise DeliveryError(f"outbox {self.directory}: {exc}", unreachable=True) from None
        log.debug("wrote %s for %s", path, recipient)

    def was_delivered(self, message_id: str) -> bool | None:
        return self._path(message_id).exists()

    def close(self) -> None:
        pass


def make_transport(settings: SmtpSettings) -> Transport:
    """SMTP when a host is configured; otherwise the outbox directory (the demo, development)."""
    if settings.host:
        return SmtpTransport(settings)
    return OutboxTransport(settings.outbox_dir)
