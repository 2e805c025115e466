"""R4: SMTP down, 4xx and 5xx, against a real SMTP server (aiosmtpd) and the real delivery runner.

One trial = one done analysis with changes (:func:`tests.factories.world`) whose area has two recipients:
one the server treats normally and one it faults. The runner (``monitor.reports.run_deliveries``) is
called at the trial's start and again after each retry back-off (its ``now`` moved past
``smtp.retry_base_seconds``), then once more a day later. Every delivery (analysis × recipient) is a try:

- a transient fault (server down, 451 at RCPT, 451 at DATA) must end ``sent``, accepted exactly once;
- a permanent one (550 at RCPT, 554 at DATA) and a transient one that outlasts ``smtp.max_attempts`` must
  end ``failed`` with the server's reason in ``last_error`` and nothing accepted.

- lost: a delivery neither accepted once and ``sent`` nor ``failed`` with a reason;
- duplicated: a delivery accepted more than once;
- tracebacks: an exception out of ``run_deliveries``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg

from core.db import session_scope
from monitor.reports import run_deliveries
from tests import factories
from tests.chaos.lab import Lab, Tally, truncate_app
from tests.chaos.mail import MailServer

MAX_ATTEMPTS = 3
# fault -> (expected final status, text the reason must contain)
FAULTS: dict[str, tuple[str, str]] = {
    "down": ("sent", ""),
    "451 at RCPT": ("sent", ""),
    "451 at DATA": ("sent", ""),
    "550 at RCPT": ("failed", "550"),
    "554 at DATA": ("failed", "554"),
    "451 until out of attempts": ("failed", f"gave up after {MAX_ATTEMPTS} attempts"),
}


def _apply(fault: str, mail: MailServer, faulty: str, step: int) -> None:
    """Set the server up for runner call ``step`` (0 = the first) of a trial with ``fault``."""
    rec = mail.recorder
    rec.rcpt_replies.clear()
    rec.data_replies.clear()
    if fault == "down":
        mail.stop() if step == 0 else mail.start()
        return
    mail.start()
    if fault == "451 at RCPT" and step == 0:
        rec.rcpt_replies[faulty] = "451 4.3.0 mailbox busy, try later"
    elif fault == "451 at DATA" and step == 0:
        rec.data_replies[faulty] = ["451 4.3.0 queue full, try later"]
    elif fault == "550 at RCPT":
        rec.rcpt_replies[faulty] = f"550 5.1.1 <{faulty}>: no such user"
    elif fault == "554 at DATA" and step == 0:
        rec.data_replies[faulty] = ["554 5.7.1 message refused"]
    elif fault == "451 until out of attempts":
        rec.rcpt_replies[faulty] = "451 4.3.0 mailbox busy, try later"


def _deliveries(url: str) -> list[dict]:
    with psycopg.connect(url.replace("+psycopg", ""), row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT * FROM deliveries WHERE delivery_key LIKE 'analysis:%' ORDER BY id").fetchall()


def _trial(lab: Lab, mail: MailServer, fault: str, n: int, tally: Tally) -> None:
    base = lab.settings(smtp_port=mail.port)
    settings = base.model_copy(update={"smtp": base.smtp.model_copy(update={"max_attempts": MAX_ATTEMPTS})})
    truncate_app(settings.database_url)
    mail.start()
    with mail.recorder.lock:
        mail.recorder.messages.clear()
    normal, faulty = f"ok-{n}@example.org", f"faulted-{n}@example.org"
    with session_scope(settings) as session:
        analysis = factories.world(session, name=f"chaos R4 {n}", recipients=[normal, faulty])
    key = f"analysis:{analysis.id}"
    t0 = datetime.now(UTC)
    step_seconds = settings.smtp.retry_max_seconds + 1  # past any back-off the runner can choose
    first: dict[str, int] = {}
    for step in range(MAX_ATTEMPTS + 1):
        _apply(fault, mail, faulty, step)
        try:
            counts = run_deliveries(settings, now=t0 + timedelta(seconds=step * step_seconds))
            first = counts if step == 0 else first
        except Exception as exc:
            tally.tracebacks += 1
            tally.note(f"R4 {fault}: run_deliveries raised {type(exc).__name__}: {exc}")
    mail.start()
    mail.recorder.rcpt_replies.clear()
    mail.recorder.data_replies.clear()
    again = run_deliveries(settings, now=t0 + timedelta(days=1))
    accepted = mail.accepted()
    rows = {r["recipient"]: r for r in _deliveries(settings.database_url)}
    for recipient, (status, reason) in ((normal, ("sent", "")), (faulty, FAULTS[fault])):
        tally.tries += 1
        row = rows.get(recipient)
        got = accepted[(key, recipient)]
        if got > 1:
            tally.duplicated += 1
        if row is None:
            ok = False
        elif status == "sent":
            # the faulted one: the first run must have met the fault (a retry), or the trial proves nothing
            retried = recipient == normal or first.get("retry", 0) >= 1
            ok = row["status"] == "sent" and got == 1 and retried
        else:
            ok = row["status"] == "failed" and reason in (row["last_error"] or "") and got == 0
        if not ok and got <= 1:
            tally.lost += 1
        if ok and got <= 1:
            tally.passed += 1
        else:
            tally.note(f"R4 {fault} {recipient}: {row and row['status']} after {row and row['attempts']} attempts "
                       f"({row and row['last_error']}), accepted {got}×, expected {status} {reason!r}")
    if again["sent"]:
        tally.duplicated += again["sent"]
        tally.note(f"R4 {fault}: the day-later run sent {again['sent']} more")


def r4_smtp_faults(lab: Lab, rounds: int = 3, *, seed: int = 4, log: Callable[[str], None] = print) -> Tally:
    """``rounds`` × every fault of :data:`FAULTS` in a random order, two deliveries each."""
    rng = random.Random(seed)
    tally = Tally()
    mail = MailServer()
    try:
        n = 0
        for r in range(rounds):
            for fault in rng.sample(list(FAULTS), len(FAULTS)):
                n += 1
                _trial(lab, mail, fault, n, tally)
            log(f"R4 round {r + 1}/{rounds}: {tally.passed}/{tally.tries} deliveries as expected")
    finally:
        mail.stop()
    return tally
