"""Alert deliveries end to end: real PostGIS, a real SMTP server on a loopback port, real MIME parsing of what
it received and real crashes (a killed process): each recipient gets exactly one complete email whatever fails."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import shape

from core.config import get_settings
from core.db import session_scope
from monitor.reports import ledger, run_deliveries
from monitor.reports.immediate import create_immediate_deliveries
from monitor.reports.render import ATTRIBUTION
from tests.fixtures_mail import REPO, SENDER, deliveries, free_port, parts_of, start_smtp, world
from tests.fixtures_reports import insert_worker_world
from workers.mapframe import FOOTER_PX, OUTLINE, SWATCH_PX
from workers.render import CLASS_COLOURS


def _footer_swatches(png: bytes) -> dict[str, int]:
    """Pixels of each legend colour in the strip under the map of an email image."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    footer = pixels[-FOOTER_PX:]
    colours = {"outline": OUTLINE, "vegetation loss": CLASS_COLOURS[3], "vegetation gain": CLASS_COLOURS[4],
               "new built-up": CLASS_COLOURS[2], "water change": CLASS_COLOURS[1]}
    return {name: int(np.all(footer == colour, axis=-1).sum()) for name, colour in colours.items()}


def test_each_recipient_gets_exactly_one_complete_email(db, smtp, worker_output):
    recipients = ["ana@example.org", "bob@example.org"]
    with session_scope(get_settings()) as s:
        an = insert_worker_world(s, worker_output, name="Apuseni forest", recipients=recipients).id
        insert_worker_world(s, worker_output, name="Quiet valley", min_ha=5.0)  # 0.25 ha of loss < 5 ha
        insert_worker_world(s, worker_output, name="Digest only", frequency="daily", recipients=["d@example.org"])
        insert_worker_world(s, worker_output, name="Muted", frequency="off", recipients=["m@example.org"])

    counts = run_deliveries(get_settings())
    assert counts["alerts_queued"] == 2 and counts["sent"] == 3  # 2 alerts + the daily area's first digest
    alerts = [(rcpt, m) for rcpt, m in smtp.parsed() if m["X-UniRS-Delivery"].startswith("analysis:")]
    assert sorted(r for rcpt, _ in alerts for r in rcpt) == recipients
    assert not any("m@example.org" in rcpt for rcpt, _ in smtp.parsed())

    for rcpt, msg in alerts:
        assert msg["To"] == rcpt[0] and msg["From"] == SENDER
        assert msg["Message-ID"] == ledger.message_id_for(f"analysis:{an}", rcpt[0])
        assert msg["Subject"] == "Forest loss 0.25 ha — Apuseni forest — 2018-08-25"
        p = parts_of(msg)
        roles = [i["Content-ID"].strip("<>").split("@")[0].rsplit("-", 1)[1] for i in p["images"]]
        assert roles == ["before", "after", "overlay"]
        assert [i.get_content_type() for i in p["images"]] == ["image/png"] * 3
        for role, image in zip(roles, p["images"], strict=True):
            assert f'src="cid:{image["Content-ID"].strip("<>")}"' in p["html"]
            # The sample grid is 103 × 100 px of 10 m: the map is upscaled to 512 × 497, plus the footer.
            assert Image.open(io.BytesIO(image.get_content())).size == (512, 497 + FOOTER_PX)
            swatches = _footer_swatches(image.get_content())
            # The legend: the area outline on every image; on the overlay the two classes the pair has.
            expected = {"outline": 1, "vegetation loss": role == "overlay", "vegetation gain": role == "overlay",
                        "new built-up": 0, "water change": 0}
            assert swatches == {k: int(v) * SWATCH_PX ** 2 for k, v in expected.items()}, role
        html, text = p["html"], p["text"]
        for fact in ("Vegetation loss of 0.25 ha, mostly in the west of the area; vegetation gain of 1.30 ha",
                     "vegetation loss", "vegetation gain", "1.55 ha", "0.25 ha", "1.30 ha",
                     "Has vegetation (forest, crops, grassland) been removed?",
                     "Yes: about 0.25 ha of vegetation was lost (NDVI fell by 0.2 or more).",
                     "sentinel-2a", "S2A_34TER_20170711_0_L2A", "S2A_34TER_20180825_0_L2A", "100 %",
                     "latest earlier clear acquisition of tile 34TER: 2017-07-11", "spectral",
                     "https://www.openstreetmap.org/?mlat=", ATTRIBUTION):
            assert fact in html and fact in text, fact
        assert "written from the pixel statistics (spectral)" in text and "UniRS model" not in text
        # The summary's figure is the pair's valid fraction (both scenes clear over the area), not a
        # confidence of any model: it is called what it is.
        assert ("written from the pixel statistics (spectral), from 100 % of the area's pixels valid in both "
                "images") in text
        assert "of the area&#39;s pixels valid in both images" in html
        assert "spectral) · confidence" not in html and "(spectral), confidence" not in text

        (geojson,) = p["attachments"]
        assert geojson.get_content_type() == "application/geo+json"
        assert geojson.get_filename() == f"changes-apuseni-forest-analysis-{an}.geojson"
        fc = json.loads(geojson.get_content())
        run = worker_output.runs["2018-08-25"]
        assert [(ft["properties"]["change_class"], ft["properties"]["hectares"]) for ft in fc["features"]] == [
            (r["change_class"], r["hectares"]) for r in run.regions()]
        for feat, region in zip(fc["features"], run.regions(), strict=True):
            # lon/lat order, the worker's polygon (7 decimals: ~1 cm)
            assert shape(feat["geometry"]).hausdorff_distance(region["geom"]) < 1e-6

    rows = deliveries(db)
    assert {r["status"] for r in rows} == {"sent"}
    assert not [r for r in rows if r["delivery_key"].startswith("analysis:") and r["analysis_id"] != an]

    again = run_deliveries(get_settings())
    assert again["sent"] == 0 and again["alerts_queued"] == 0 and len(smtp.messages) == 3


def test_no_sender_no_smtp_email_and_nothing_lost(db, smtp, configure, worker_output):
    configure(UNIRS_SMTP__SENDER="")
    world(worker_output, recipients=["ana@example.org"])
    counts = run_deliveries(get_settings())
    assert (counts["alerts_queued"], counts["sender_missing"], counts["sent"]) == (1, 1, 0)
    assert smtp.messages == [] and [r["status"] for r in deliveries(db)] == ["pending"]
    configure(UNIRS_SMTP__SENDER=SENDER)
    assert run_deliveries(get_settings())["sent"] == 1
    assert smtp.parsed()[0][1]["From"] == SENDER


def test_smtp_down_then_up_delivers_once(db, configure, worker_output):
    port = free_port()  # nothing listens here yet
    configure(UNIRS_SMTP__HOST="127.0.0.1", UNIRS_SMTP__PORT=port, UNIRS_SMTP__TIMEOUT_SECONDS=5,
              UNIRS_SMTP__SENDER=SENDER)
    world(worker_output, recipients=["ana@example.org"])
    t0 = datetime.now(UTC)

    assert run_deliveries(get_settings(), now=t0)["retry"] == 1
    (row,) = deliveries(db)
    assert row["status"] == "pending" and row["attempts"] == 1
    assert "unreachable" in row["last_error"] and "ConnectionRefused" in row["last_error"]
    assert timedelta(seconds=290) < row["next_attempt_at"] - t0 <= timedelta(seconds=301)  # backoff base 300 s

    assert run_deliveries(get_settings(), now=t0 + timedelta(seconds=10))["retry"] == 0  # not due yet: not even tried

    controller, server = start_smtp(port)
    try:
        assert run_deliveries(get_settings(), now=t0 + timedelta(seconds=301))["sent"] == 1
        assert run_deliveries(get_settings(), now=t0 + timedelta(days=1))["sent"] == 0
        assert len(server.messages) == 1
    finally:
        controller.stop()
    (row,) = deliveries(db)
    assert row["status"] == "sent" and row["attempts"] == 2 and row["last_error"] is None


def test_5xx_is_permanent_4xx_is_retried_until_attempts_run_out(db, smtp, configure, worker_output):
    configure(UNIRS_SMTP__MAX_ATTEMPTS=2)
    smtp.rcpt_replies = {"gone@example.org": "550 5.1.1 <gone@example.org>: no such user",
                         "busy@example.org": "451 4.3.0 mailbox busy, try later"}
    world(worker_output, recipients=["ana@example.org", "gone@example.org", "busy@example.org"])
    t0 = datetime.now(UTC)
    counts = run_deliveries(get_settings(), now=t0)
    assert (counts["sent"], counts["failed"], counts["retry"]) == (1, 1, 1)
    rows = {r["recipient"]: r for r in deliveries(db)}
    assert rows["gone@example.org"]["status"] == "failed" and rows["gone@example.org"]["permanent_failure"]
    assert "550 5.1.1" in rows["gone@example.org"]["last_error"]
    assert rows["busy@example.org"]["status"] == "pending" and "451" in rows["busy@example.org"]["last_error"]

    assert run_deliveries(get_settings(), now=t0 + timedelta(seconds=301))["failed"] == 1
    busy = {r["recipient"]: r for r in deliveries(db)}["busy@example.org"]
    assert busy["status"] == "failed" and not busy["permanent_failure"] and busy["attempts"] == 2
    assert busy["last_error"].startswith("gave up after 2 attempts")
    assert [rcpt for rcpt, _ in smtp.messages] == [["ana@example.org"]]


def test_crash_after_the_server_accepted_never_sends_twice(db, smtp, worker_output):
    """A worker process killed between SMTP acceptance and `mark_sent` (the one ambiguous window)."""
    world(worker_output, recipients=["ana@example.org"])
    crash = "import os\nfrom core.config import get_settings\nfrom monitor.reports import ledger, runner\n" \
            "ledger.mark_sent = lambda *a, **k: os._exit(70)\nrunner.run_deliveries(get_settings())\n"
    proc = subprocess.run([sys.executable, "-c", crash], cwd=REPO, env=dict(os.environ), timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 70, proc.stderr
    assert len(smtp.messages) == 1
    (row,) = deliveries(db)
    assert row["status"] == "sending"

    assert run_deliveries(get_settings())["sent"] == 0  # the lease has not expired: the row is left alone
    lease = get_settings().smtp.lease_seconds
    counts = run_deliveries(get_settings(), now=datetime.now(UTC) + timedelta(seconds=lease + 1))
    assert counts["recovered_unknown"] == 1 and counts["sent"] == 0
    (row,) = deliveries(db)
    assert row["status"] == "failed" and not row["permanent_failure"]
    assert row["last_error"].startswith("outcome unknown")
    assert run_deliveries(get_settings(), now=datetime.now(UTC) + timedelta(days=2))["sent"] == 0
    assert len(smtp.messages) == 1


def test_outbox_crashes_resolve_exactly_once(db, configure, tmp_path, monkeypatch, worker_output):
    """With an outbox the outcome is knowable: claimed-but-not-written is resent, written is marked sent."""
    an = world(worker_output, recipients=["ana@example.org", "bob@example.org"])
    outbox = tmp_path / "outbox"
    t0 = datetime.now(UTC)
    lease = timedelta(seconds=get_settings().smtp.lease_seconds + 1)

    # ana: a worker claimed the row and died before writing anything.
    with session_scope(get_settings()) as s:
        assert create_immediate_deliveries(s, t0, get_settings()) == 2
    with session_scope(get_settings()) as s:
        ana_id = next(r["id"] for r in deliveries(db) if r["recipient"] == "ana@example.org")
        assert ledger.claim(s, ana_id, t0, get_settings().smtp.lease_seconds)

    # bob: written to the outbox, then the worker died before marking it sent.
    class Crash(BaseException):
        pass

    def crash(*args, **kwargs):
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(ledger, "mark_sent", crash)
        with pytest.raises(Crash):
            run_deliveries(get_settings(), now=t0)
    bob_file = outbox / (ledger.message_id_for(f"analysis:{an}", "bob@example.org")[1:].split("@")[0] + ".eml")
    assert bob_file.exists() and len(list(outbox.glob("*.eml"))) == 1
    written = bob_file.stat().st_mtime_ns

    counts = run_deliveries(get_settings(), now=t0 + lease)
    assert counts["recovered_sent"] == 1 and counts["recovered_pending"] == 1 and counts["sent"] == 1
    assert {r["status"] for r in deliveries(db)} == {"sent"}
    assert len(list(outbox.glob("*.eml"))) == 2 and bob_file.stat().st_mtime_ns == written


def test_concurrent_runners_send_each_delivery_once(db, smtp, worker_output):
    for i in range(3):
        world(worker_output, name=f"Forest {i}", recipients=["ana@example.org", "bob@example.org"])
    barrier = threading.Barrier(2)
    results = []

    def worker():
        barrier.wait()
        results.append(run_deliveries(get_settings()))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sum(r["sent"] for r in results) == 6
    ids = [m["Message-ID"] for _, m in smtp.parsed()]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert {r["status"] for r in deliveries(db)} == {"sent"}


# ---------------------------------------------------------------------------------------- digests


def test_claim_lease_runs_from_the_claim_not_from_the_start_of_a_slow_run(db, worker_output):
    """A batch that started long ago (slow SMTP) must not hand out leases that are already expired: a
    concurrent runner would settle the row as "outcome unknown" while it is still being sent."""
    world(worker_output, recipients=["ana@example.org"])
    with session_scope(get_settings()) as s:
        create_immediate_deliveries(s, datetime.now(UTC), get_settings())
    run_started = datetime.now(UTC) - timedelta(hours=1)
    (row,) = deliveries(db)
    with session_scope(get_settings()) as s:
        claim = ledger.claim(s, row["id"], run_started, get_settings().smtp.lease_seconds)
    assert claim is not None
    with session_scope(get_settings()) as s:
        assert ledger.stale_sending(s, datetime.now(UTC)) == []
