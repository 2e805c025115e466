"""Shared parts of the report tests (pytest plugin, registered in tests/conftest.py): a real SMTP server
(aiosmtpd) on a loopback port recording what it accepted, the ``configure`` and ``smtp`` fixtures pointing the
settings at an outbox or at that server, and helpers reading the deliveries and the MIME parts a mail client
would use (tests/test_reports_*.py, test_deliveries_attention.py, test_unsubscribe.py, chaos/mail.py)."""

from __future__ import annotations

import email
import socket
import threading
from email import policy
from email.message import EmailMessage
from pathlib import Path

import psycopg
import pytest
from aiosmtpd.controller import Controller

from core.config import get_settings
from core.db import session_scope
from tests.fixtures_reports import WorkerOutput, insert_worker_world

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "var" / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
SENDER = "UniRS Monitor <alerts@monitor.example.org>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """aiosmtpd handler: keeps every accepted message; per-recipient RCPT replies simulate refusals."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []
        self.rcpt_replies: dict[str, str] = {}
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append((list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted for delivery"

    def parsed(self) -> list[tuple[list[str], EmailMessage]]:
        return [(rcpt, email.message_from_bytes(raw, policy=policy.default)) for rcpt, raw in self.messages]


def start_smtp(port: int) -> tuple[Controller, Recorder]:
    handler = Recorder()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    return controller, handler


@pytest.fixture
def configure(monkeypatch, tmp_path):
    """Point the one settings object at an outbox in tmp_path (no SMTP host) unless told otherwise."""

    def apply(**env: object) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        get_settings.cache_clear()

    monkeypatch.delenv("UNIRS_SMTP__HOST", raising=False)
    apply(UNIRS_SMTP__OUTBOX_DIR=tmp_path / "outbox")
    yield apply
    get_settings.cache_clear()


@pytest.fixture
def smtp(configure):
    """A real SMTP server on a free loopback port, with the settings pointed at it."""
    port = free_port()
    controller, handler = start_smtp(port)
    configure(UNIRS_SMTP__HOST="127.0.0.1", UNIRS_SMTP__PORT=port, UNIRS_SMTP__TIMEOUT_SECONDS=5,
              UNIRS_SMTP__SENDER=SENDER)
    handler.port = port
    yield handler
    controller.stop()


def world(output: WorkerOutput, **kw) -> int:
    """One committed area with the worker's 2018-08-25 analysis (or ``after=``); returns the analysis id."""
    with session_scope(get_settings()) as s:
        return insert_worker_world(s, output, **kw).id


def deliveries(db_url: str) -> list[dict]:
    with psycopg.connect(db_url.replace("+psycopg", ""), row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT * FROM deliveries ORDER BY id").fetchall()


def parts_of(msg: EmailMessage) -> dict:
    """The pieces a mail client would use, checking the MIME structure on the way."""
    assert msg.get_content_type() == "multipart/mixed"
    alternative, *attachments = msg.get_payload()
    assert alternative.get_content_type() == "multipart/alternative"
    plain, related = alternative.get_payload()
    assert plain.get_content_type() == "text/plain"
    if related.get_content_type() == "text/html":  # nothing to show inline: no multipart/related either
        return {"text": plain.get_content(), "html": related.get_content(), "images": [], "attachments": attachments}
    assert related.get_content_type() == "multipart/related"
    html_part, *images = related.get_payload()
    assert html_part.get_content_type() == "text/html"
    return {"text": plain.get_content(), "html": html_part.get_content(), "images": images,
            "attachments": attachments}


# ------------------------------------------------------------------------------------------- unit level
