"""Alert reports end to end: real PostGIS, a real SMTP server (aiosmtpd) on a loopback port, real MIME
parsing of what it received, real crashes (a killed process), and a real browser for the layout."""

from __future__ import annotations

import email
import io
import json
import os
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path

import numpy as np
import psycopg
import pytest
from aiosmtpd.controller import Controller
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from shapely.geometry import shape
from sqlalchemy import select

from core.config import get_settings
from core.db import session_scope
from core.models import Analysis, AnalysisStatus, Finding
from monitor.reports import ledger, run_deliveries
from monitor.reports.context import agreement, load_analysis_report, osm_link
from monitor.reports.immediate import create_immediate_deliveries
from monitor.reports.message import build_message
from monitor.reports.render import ATTRIBUTION, RenderedEmail, render_alert
from monitor.reports.sanitize import header_text
from tests import factories as f
from tests.fixtures_reports import WorkerOutput, insert_worker_world
from workers.mapframe import FOOTER_PX, OUTLINE, SWATCH_PX
from workers.render import CLASS_COLOURS

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "var" / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
SENDER = "UniRS Monitor <alerts@monitor.example.org>"


# --------------------------------------------------------------------------------------------- fixtures


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


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_header_text_is_always_one_safe_line(value):
    clean = header_text(value, max_length=80)
    assert len(clean) <= 80
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in clean)
    msg = EmailMessage()
    msg["Subject"] = clean  # the email package accepts it (it refuses CR/LF)
    parsed = email.message_from_bytes(msg.as_bytes(policy=policy.SMTP), policy=policy.default)
    assert set(parsed.keys()) == {"Subject"} and "\n" not in parsed["Subject"] and "\r" not in parsed["Subject"]
    # CPython drops a space between two RFC 2047 encoded words on decoding; the text is otherwise intact.
    assert "".join(parsed["Subject"].split()) == "".join(clean.split())


def test_build_message_refuses_line_breaks_in_recipient_and_sender():
    """Recipients and the sender come from areas and settings, not through header_text: build_message must
    refuse a line break in them rather than write a second header."""
    rendered = RenderedEmail(subject="s", text="t", html="<p>h</p>")
    for recipient, sender in (("ana@example.org\r\nBcc: victim@example.org", "UniRS <a@example.org>"),
                              ("ana@example.org", "UniRS <a@example.org>\nX-Evil: 1")):
        with pytest.raises(ValueError):
            build_message(rendered, sender=sender, recipient=recipient, message_id="<m@x>", delivery_key="analysis:1")
    msg = build_message(rendered, sender=SENDER, recipient="ana@example.org", message_id="<m@x>",
                        delivery_key="analysis:1")
    assert (msg["From"], msg["To"], msg["X-UniRS-Delivery"]) == (SENDER, "ana@example.org", "analysis:1")


def test_agreement_and_links():
    assert agreement("Yes, clearly", {"statistic_answer": "yes"}) == "agrees"
    assert agreement("No", {"statistic_answer": "yes"}) == "disagrees"
    assert agreement("about 9 ha", {"statistic_answer": 4.3}) == "disagrees"
    assert agreement("4.5 hectares", {"statistic_answer": 4.3}) == "agrees"
    assert agreement("anything", {"agrees": False, "statistic_answer": "anything"}) == "disagrees"
    assert agreement("yes", {"forest_loss_ha": 3}) is None  # nothing to compare with: "not checked"
    # What the workers record (workers/unirs.py agreement(), workers/pipeline.py build_rows()).
    assert agreement("Yes", {"agrees": True, "comparison": "yes/no"}) == "agrees"
    assert agreement("12 ha", {"agrees": False, "comparison": "number"}) == "disagrees"
    assert agreement("maybe", {"agrees": False, "comparison": "unreadable"}) is None
    assert agreement("yes", {"agrees": None, "spectral_answer": "yes"}) == "computed"
    assert osm_link("https://www.openstreetmap.org/", 23.13, 46.52, 14) == (
        "https://www.openstreetmap.org/?mlat=46.52000&mlon=23.13000#map=14/46.52000/23.13000")
    assert ledger.message_id_for("analysis:1", "a@example.org") == ledger.message_id_for("analysis:1", "a@example.org")
    assert ledger.message_id_for("analysis:1", "a@example.org") != ledger.message_id_for("analysis:1", "b@example.org")
    assert ledger.message_id_for("digest:7", "a@example.org").startswith("<delivery-")


# ------------------------------------------------------------------------------------- rendering


def test_hostile_area_names_and_model_text_are_escaped_and_kept_out_of_headers(db, configure, worker_output):
    name = 'Apuseni <script>alert("x")</script>\r\nBcc: victim@evil.example'
    caption = '<img src=x onerror=alert(1)> clear-cut\r\nX-Injected: yes'
    with session_scope(get_settings()) as s:
        an = insert_worker_world(s, worker_output, name=name)
        # What a model could write, over the worker's rows: a hostile caption, question, answer and statistic.
        summary = s.execute(select(Finding).where(Finding.analysis_id == an.id, Finding.kind == "summary")).scalar_one()
        summary.caption = caption
        answer = s.execute(select(Finding).where(Finding.analysis_id == an.id, Finding.kind == "answer")
                           .order_by(Finding.ordinal).limit(1)).scalar_one()
        answer.question, answer.answer = "<b>Is it a road?</b>", "<script>steal()</script> yes"
        answer.statistics = {**answer.statistics, "<i>px</i>": "<svg onload=alert(1)>"}
    with session_scope(get_settings()) as s:
        report = load_analysis_report(s, an.id, get_settings().public_url)
    rendered = render_alert(report, "ana@example.org")

    html = rendered.html
    for raw in ("<script", "<img src=x", "<svg", "<b>Is it", "<i>px"):
        assert raw not in html
    for escaped in ("&lt;script&gt;alert(", "&lt;img src=x onerror=alert(1)&gt;", "&lt;svg onload=alert(1)&gt;",
                    "&lt;b&gt;Is it a road?&lt;/b&gt;", "&lt;script&gt;steal()&lt;/script&gt; yes"):
        assert escaped in html
    assert "\r" not in rendered.subject and "\n" not in rendered.subject
    assert rendered.subject == ('Forest loss 0.25 ha — Apuseni <script>alert("x")</script> Bcc: victim@evil.example'
                                " — 2018-08-25")

    msg = build_message(rendered, sender="UniRS <alerts@example.org>", recipient="ana@example.org",
                        message_id="<m1@unirs-monitor>", delivery_key="analysis:1")
    raw = msg.as_bytes(policy=policy.SMTP)
    head = raw.split(b"\r\n\r\n", 1)[0]
    # Unfolded, the head is exactly our headers in our order: nothing injected, nothing split off.
    names = [line.split(b":", 1)[0] for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t")]
    assert names == [b"Subject", b"From", b"To", b"Date", b"Message-ID", b"Auto-Submitted", b"X-UniRS-Delivery",
                     b"MIME-Version", b"Content-Type"]
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert parsed["Bcc"] is None and parsed["X-Injected"] is None
    assert parsed["Subject"] == rendered.subject
    assert parsed.get_all("To") == ["ana@example.org"]


def test_sparse_analysis_renders_every_empty_state(db, configure):
    """No before scene, no thumbnails, no regions, no answers, an event, odd stats: nothing breaks."""
    with session_scope(get_settings()) as s:
        area = f.area(s, name="Sparse")
        after = f.scene(s, f.catalogue(s), datetime(2021, 3, 1, tzinfo=UTC), platform="landsat-9", cloud=None,
                         collection="landsat-c2-l2")
        an = f.analysis(s, area, after, None, pair_reason=None, stats={"nested": {"a": 1.23456, "b": [1, 2]}})
        f.findings(s, an, caption="Flooding along the river", regions=[], answers=[], images=False)
        s.add(Finding(analysis_id=an.id, area_id=area.id, ordinal=9, kind="event", change_class="flood",
                      caption="Seasonal flood", confidence=0.4, statistics={}, analyser_name="unirs",
                      analyser_version="0.3.1", observed_at=after.acquired_at))
    with session_scope(get_settings()) as s:
        report = load_analysis_report(s, an.id, "https://maps.example.org/")
    rendered = render_alert(report, "ana@example.org")
    assert report.map_url.startswith("https://maps.example.org/?mlat=46.55000&mlon=23.15000#map=")
    for fact in ("No thumbnails were produced", "No changed regions were delineated", "Seasonal flood",
                 "landsat-9", "not recorded", "nested.a", "1.235", "low (0.40)"):
        assert fact in rendered.html, fact
    assert ATTRIBUTION not in rendered.html and ATTRIBUTION not in rendered.text  # not Sentinel-2 data
    assert "Questions" not in rendered.html
    assert rendered.subject == "0.00 ha changed, none of it alerting — Sparse — 2021-03-01"


# -------------------------------------------------------------------------------------- delivery


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


def test_daily_digest_aggregates_the_period_with_a_health_section(db, smtp, worker_output):
    now = datetime.now(UTC)
    with session_scope(get_settings()) as s:
        first = insert_worker_world(s, worker_output, "2018-08-25", name="Daily forest", frequency="daily",
                                    recipients=["ana@example.org", "bob@example.org"],
                                    finished_at=now - timedelta(hours=20))
        second = insert_worker_world(s, worker_output, "2020-08-29", area=first.area,
                                     finished_at=now - timedelta(hours=19))
        s.add(Analysis(idempotency_key="failed-one", area_id=first.area_id, after_scene_id=second.after_scene_id,
                       before_scene_id=first.after_scene_id, analyser="spectral@1", question_set="@1",
                       pairing_policy="latest", status=AnalysisStatus.FAILED, attempts=3, stats={},
                       finished_at=now - timedelta(hours=2),
                       last_error="COG read timed out: https://sentinel-cogs.example/B04.tif"))
        # An immediate area's analysis is not part of this digest.
        insert_worker_world(s, worker_output, name="Elsewhere", recipients=["zed@example.org"])
    captions = [worker_output.runs[d].summary["caption"] for d in ("2018-08-25", "2020-08-29")]

    counts = run_deliveries(get_settings(), now=now)
    assert counts["digests_created"] == 1 and counts["digest_deliveries_queued"] == 2
    digests = [(rcpt, m) for rcpt, m in smtp.parsed() if m["X-UniRS-Delivery"].startswith("digest:")]
    assert sorted(rcpt[0] for rcpt, _ in digests) == ["ana@example.org", "bob@example.org"]
    for _, msg in digests:
        # 1.55 ha (2018-08-25) + 1.42 ha (2020-08-29) of change found, rounded once, the same everywhere.
        assert "Daily forest daily digest" in msg["Subject"] and "2 analyses, 2.97 ha changed" in msg["Subject"]
        assert "(attention needed)" in msg["Subject"]
        p = parts_of(msg)
        for caption in captions:
            assert caption in p["html"] and caption in p["text"]
        assert "Elsewhere" not in p["html"]  # the immediate area's analysis
        for fact in ("Pipeline health", "COG read timed out: https://sentinel-cogs.example/B04.tif",
                     "no clear scene", "2020-08-29", "1 failed"):
            assert fact in p["html"], fact
        assert "WARNING: none for 14+ days" in p["text"]
        assert len(p["images"]) == 6  # two detailed analyses × before/after/overlay
        for image in p["images"]:
            assert f'cid:{image["Content-ID"].strip("<>")}' in p["html"]
        fc = json.loads(p["attachments"][0].get_content())
        assert len(fc["features"]) == 8 + 4  # the two analyses' regions

    assert run_deliveries(get_settings(), now=now + timedelta(minutes=5))["digests_created"] == 0  # not due again yet
    later = run_deliveries(get_settings(), now=now + timedelta(hours=25))
    assert later["digests_created"] == 1 and later["sent"] == 2
    _, quiet = smtp.parsed()[-1]
    assert "0 analyses" in quiet["Subject"] and "No analysis finished in this period" in parts_of(quiet)["html"]


# ------------------------------------------------------------------------------ outbox and browser


def _outbox_run(db, worker_output) -> list[Path]:
    world(worker_output, recipients=["ana@example.org"])
    world(worker_output, name="Daily forest", frequency="daily", recipients=["ana@example.org"])
    assert run_deliveries(get_settings())["sent"] == 2
    return sorted(get_settings().smtp.outbox_dir.glob("*.eml"))


def test_outbox_writes_eml_and_browser_preview(db, configure, worker_output):
    emls = _outbox_run(db, worker_output)
    assert len(emls) == 2
    for eml in emls:
        msg = email.message_from_bytes(eml.read_bytes(), policy=policy.default)
        assert eml.stem == msg["Message-ID"].strip("<>").split("@")[0]
        parts_of(msg)
        preview = eml.with_suffix(".html").read_text(encoding="utf-8")
        assert "cid:" not in preview and "data:image/png;base64," in preview
        assert msg["Subject"].split(":")[0] in preview


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                    "(scripts/setup-services installs it); the layout screenshot is skipped")
def test_email_renders_in_headless_chromium(db, configure, tmp_path, worker_output):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for eml in _outbox_run(db, worker_output):
        kind = "digest" if "digest" in eml.read_text(encoding="utf-8", errors="replace")[:2000] else "alert"
        png = ARTIFACTS / f"email-{kind}.png"
        png.unlink(missing_ok=True)
        subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", f"--screenshot={png}", "--window-size=800,1400",
             eml.with_suffix(".html").as_uri()],
            check=True, timeout=120, capture_output=True,
        )
        with Image.open(png) as shot:
            assert shot.size == (800, 1400)
            colours = shot.convert("RGB").getcolors(maxcolors=1_000_000)
            assert colours is not None and len(colours) > 50  # text and thumbnails, not a blank page


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
