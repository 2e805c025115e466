"""Assembling a MIME message from a rendered email.

Structure (what mail clients expect for HTML with inline images and a file)::

    multipart/mixed
      multipart/alternative
        text/plain
        multipart/related
          text/html                 (references images as cid:…)
          image/png  Content-ID …   (before, after, overlay)
      application/geo+json          (attachment: the changed regions)

:class:`email.message.EmailMessage` with the default policy refuses CR/LF in header values, a second
line of defence behind :func:`monitor.reports.sanitize.header_text`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime

from monitor.reports.render import RenderedEmail


def build_message(
    rendered: RenderedEmail,
    *,
    sender: str,
    recipient: str,
    message_id: str,
    delivery_key: str,
    date: datetime | None = None,
    headers: dict[str, str] | None = None,
) -> EmailMessage:
    """``headers``: extra header fields (List-Unsubscribe, List-Unsubscribe-Post)."""
    msg = EmailMessage()
    msg["Subject"] = rendered.subject
    msg["From"] = sender
    msg["To"] = recipient
    msg["Date"] = format_datetime(date or datetime.now(UTC))
    msg["Message-ID"] = message_id
    # RFC 3834: vacation responders must not answer automated alerts.
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-UniRS-Delivery"] = delivery_key
    for name, value in (headers or {}).items():
        msg[name] = value
    # Quoted-printable: 7-bit safe for any relay and no line longer than SMTP's 998-octet limit.
    msg.set_content(rendered.text, cte="quoted-printable")
    msg.add_alternative(rendered.html, subtype="html", cte="quoted-printable")
    if rendered.images:
        html_part = msg.get_payload()[-1]
        for image in rendered.images:
            maintype, _, subtype = image.mime_type.partition("/")
            html_part.add_related(
                image.data, maintype=maintype, subtype=subtype or "png", cid=f"<{image.cid}>",
                filename=f"{image.cid.split('@')[0]}.{subtype or 'png'}", disposition="inline",
            )
    for attachment in rendered.attachments:
        msg.add_attachment(
            attachment.data, maintype=attachment.maintype, subtype=attachment.subtype, filename=attachment.filename
        )
    return msg
