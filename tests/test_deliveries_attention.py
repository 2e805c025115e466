"""Deliveries whose outcome is unknown are surfaced: CLI list/requeue, a metric, and the digest's health section.

A real SMTP server (aiosmtpd) and a real sender process killed between SMTP acceptance and ``mark_sent``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from click.testing import CliRunner

from core.config import get_settings
from core.db import session_scope
from monitor.cli import cli
from monitor.metrics import exposition
from monitor.reports import run_deliveries
from tests.fixtures_mail import REPO, deliveries, parts_of
from tests.fixtures_reports import insert_worker_world

CRASH = ("import os, sys\nfrom datetime import datetime\nfrom core.config import get_settings\n"
         "from monitor.reports import ledger, runner\n"
         "ledger.mark_sent = lambda *a, **k: os._exit(70)\n"
         "runner.run_deliveries(get_settings(), now=datetime.fromisoformat(sys.argv[1]))\n")


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def metric(name: str, kind: str) -> float:
    prefix = f'{name}{{kind="{kind}"}} '
    line = next(line for line in exposition(get_settings()).decode().splitlines() if line.startswith(prefix))
    return float(line.removeprefix(prefix))


def test_an_unknown_outcome_is_listed_counted_named_in_the_digest_and_requeued(db, smtp, worker_output):
    now = datetime.now(UTC)
    with session_scope(get_settings()) as s:
        insert_worker_world(s, worker_output, name="Daily forest", frequency="daily", recipients=["ana@example.org"],
                            finished_at=now - timedelta(hours=2))

    # The sender dies after the server accepted the digest, before recording it.
    proc = subprocess.run([sys.executable, "-c", CRASH, now.isoformat()], cwd=REPO, env=dict(os.environ),
                          timeout=120, capture_output=True, text=True)
    assert proc.returncode == 70, proc.stderr
    assert len(smtp.messages) == 1
    lease = get_settings().smtp.lease_seconds
    # (the claim lease runs from the real clock at the claim, a little after `now`)
    assert run_deliveries(get_settings(), now=now + timedelta(seconds=lease + 300))["recovered_unknown"] == 1
    (row,) = deliveries(db)
    assert row["status"] == "failed" and row["last_error"].startswith("outcome unknown")

    listed = run("deliveries", "list", "--unknown", "--json")
    assert listed.exit_code == 0, listed.output
    (item,) = json.loads(listed.output)
    assert (item["id"], item["kind"], item["recipient"]) == (row["id"], "unknown", "ana@example.org")
    assert item["delivery_key"].startswith("digest:")
    text = run("deliveries", "list").output
    assert f"{row['id']}\tunknown\tana@example.org\tdigest:" in text
    assert metric("unirs_email_deliveries_needing_attention", "outcome_unknown") == 1.0
    assert metric("unirs_email_deliveries_needing_attention", "failed") == 0.0

    # The next digest of the area says which email may not have arrived and what to do.
    later = run_deliveries(get_settings(), now=now + timedelta(hours=25))
    assert later["digests_created"] == 1 and later["sent"] == 1
    _, digest = smtp.parsed()[-1]
    assert "(attention needed)" in digest["Subject"]
    p = parts_of(digest)
    assert "Emails not delivered" in p["html"] and "1 email not delivered" in p["html"]
    assert f"unirs-monitor deliveries requeue {row['id']}" in p["html"]
    assert f"EMAIL OUTCOME UNKNOWN: delivery {row['id']}" in p["text"]

    # The operator checked the mail log and requeues it: sent again with the same Message-ID.
    assert run("deliveries", "requeue", str(row["id"])).exit_code == 0
    again = run("deliveries", "requeue", str(row["id"]))
    assert again.exit_code != 0 and "is not failed" in again.output
    assert run_deliveries(get_settings(), now=now + timedelta(hours=25, minutes=1))["sent"] == 1
    first, resent = smtp.parsed()[0][1], smtp.parsed()[-1][1]
    assert resent["Message-ID"] == first["Message-ID"]
    assert metric("unirs_email_deliveries_needing_attention", "outcome_unknown") == 0.0
    assert "no deliveries with an unknown outcome" in run("deliveries", "list", "--unknown").output
