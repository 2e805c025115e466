"""A real SMTP server (aiosmtpd) on a fixed loopback port that the chaos runs can take down, bring back,
and make answer 4xx/5xx at RCPT or DATA; it counts what it accepted per delivery and recipient."""

from __future__ import annotations

import email
from collections import Counter
from email import policy

from aiosmtpd.controller import Controller

from devtools import localstac
from tests.fixtures_mail import Recorder


class FaultyRecorder(Recorder):
    """:class:`tests.fixtures_mail.Recorder` plus per-recipient DATA replies, each used once in turn
    (``data_replies["a@example.org"] = ["451 …"]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.data_replies: dict[str, list[str]] = {}

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            queued = next((self.data_replies[r] for r in envelope.rcpt_tos if self.data_replies.get(r)), None)
            reply = queued.pop(0) if queued else None
        if reply is not None:
            return reply
        return await super().handle_DATA(server, session, envelope)


class MailServer:
    """``start()``/``stop()`` on the same port: while stopped, connections are refused (SMTP down)."""

    def __init__(self) -> None:
        self.port = localstac.free_port()
        self.recorder = FaultyRecorder()
        self.controller: Controller | None = None

    def start(self) -> None:
        if self.controller is None:
            self.controller = Controller(self.recorder, hostname="127.0.0.1", port=self.port)
            self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def accepted(self) -> Counter[tuple[str, str]]:
        """How many times each (X-UniRS-Delivery key, recipient) was accepted."""
        counts: Counter[tuple[str, str]] = Counter()
        with self.recorder.lock:
            raw = list(self.recorder.messages)
        for rcpts, data in raw:
            key = email.message_from_bytes(data, policy=policy.default)["X-UniRS-Delivery"]
            for rcpt in rcpts:
                counts[(str(key), rcpt)] += 1
        return counts

    def __enter__(self) -> MailServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
