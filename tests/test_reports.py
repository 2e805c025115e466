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

import psycopg
import pytest
from aiosmtpd.controller import Controller
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from shapely.geometry import box, shape

from core.config import get_settings
from core.db import session_scope
from core.models import Finding
from monitor.reports import ledger, run_deliveries
from monitor.reports.context import agreement, load_analysis_report, osm_link
from monitor.reports.immediate import create_immediate_deliveries
from monitor.reports.message import build_message
from monitor.reports.render import ATTRIBUTION, render_alert
from monitor.reports.sanitize import header_text
from tests import factories as f

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "var" / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")


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
    configure(UNIRS_SMTP__HOST="127.0.0.1", UNIRS_SMTP__PORT=port, UNIRS_SMTP__TIMEOUT_SECONDS=5)
    handler.port = port
    yield handler
    controller.stop()


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
    assert parsed["Subject"].split() == clean.split() or "".join(parsed["Subject"].split()) == "".join(clean.split())


def test_email_package_refuses_line_breaks_in_headers():
    msg = EmailMessage()
    for bad in ("a\r\nBcc: victim@example.org", "a\nX-Evil: 1", "a\rb"):
        with pytest.raises(ValueError):
            msg["Subject"] = bad


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


def test_hostile_area_names_and_model_text_are_escaped_and_kept_out_of_headers(db, configure):
    name = 'Apuseni <script>alert("x")</script>\r\nBcc: victim@evil.example'
    caption = '<img src=x onerror=alert(1)> clear-cut\r\nX-Injected: yes'
    with session_scope(get_settings()) as s:
        an = f.world(s, name=name, caption=caption, answers=[
            {"question": "<b>Is it a road?</b>", "answer": "<script>steal()</script> yes", "confidence": 0.7,
             "statistics": {"<i>px</i>": "<svg onload=alert(1)>", "statistic_answer": "yes"}},
        ])
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
    assert rendered.subject == ('Forest loss 4.30 ha — Apuseni <script>alert("x")</script> Bcc: victim@evil.example'
                                " — 2020-08-29")

    msg = build_message(rendered, sender="UniRS <alerts@example.org>", recipient="ana@example.org",
                        message_id="<m1@unirs-monitor>", delivery_key="analysis:1")
    raw = msg.as_bytes(policy=policy.SMTP)
    head = raw.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        # Every header line is a header of ours or a folded continuation (leading whitespace).
        assert line[:1] in (b" ", b"\t") or line.split(b":", 1)[0] in {
            b"Subject", b"From", b"To", b"Date", b"Message-ID", b"Auto-Submitted", b"X-UniRS-Delivery",
            b"MIME-Version", b"Content-Type"}, line
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


def test_each_recipient_gets_exactly_one_complete_email(db, smtp):
    recipients = ["ana@example.org", "bob@example.org"]
    with session_scope(get_settings()) as s:
        an = f.world(s, recipients=recipients)
        f.world(s, name="Quiet valley", min_ha=5.0,
                regions=[(box(23.12, 46.52, 23.121, 46.521), "new_built_up_or_bare", 1.0)])
        f.world(s, name="Digest only", frequency="daily", recipients=["d@example.org"])
        f.world(s, name="Muted", frequency="off", recipients=["m@example.org"])

    counts = run_deliveries(get_settings())
    assert counts["alerts_queued"] == 2 and counts["sent"] == 3  # 2 alerts + the daily area's first digest
    alerts = [(rcpt, m) for rcpt, m in smtp.parsed() if m["X-UniRS-Delivery"].startswith("analysis:")]
    assert sorted(r for rcpt, _ in alerts for r in rcpt) == recipients
    assert not any("m@example.org" in rcpt for rcpt, _ in smtp.parsed())

    for rcpt, msg in alerts:
        assert msg["To"] == rcpt[0]
        assert msg["Message-ID"] == ledger.message_id_for(f"analysis:{an.id}", rcpt[0])
        assert msg["Subject"] == "Forest loss 4.30 ha — Apuseni forest — 2020-08-29"
        p = parts_of(msg)
        assert [i.get_content_type() for i in p["images"]] == ["image/png"] * 3
        for image in p["images"]:
            assert f'src="cid:{image["Content-ID"].strip("<>")}"' in p["html"]
            assert Image.open(io.BytesIO(image.get_content())).size == (96, 96)
        html, text = p["html"], p["text"]
        for fact in ("A new forest road and two clear-cuts appear.", "vegetation loss", "3.20 ha",
                     "new built-up land or bare ground",
                     "Has forest been cleared?", "statistic agrees", "statistic disagrees", "sentinel-2b",
                     "21 %", "88 %", "97 %", "latest earlier clear scene of tile 34TFS", "unirs", "0.3.1",
                     "https://www.openstreetmap.org/?mlat=", ATTRIBUTION):
            assert fact in html and fact.replace("statistic disagrees", "statistic DISAGREES") in text, fact

        (geojson,) = p["attachments"]
        assert geojson.get_content_type() == "application/geo+json"
        assert geojson.get_filename() == f"changes-apuseni-forest-analysis-{an.id}.geojson"
        fc = json.loads(geojson.get_content())
        assert [feat["properties"]["change_class"] for feat in fc["features"]] == [
            "vegetation_loss", "new_built_up_or_bare"]
        for feat in fc["features"]:
            minx, miny, maxx, maxy = shape(feat["geometry"]).bounds
            assert 23.1 <= minx < maxx <= 23.2 and 46.5 <= miny < maxy <= 46.6  # lon/lat order

    rows = deliveries(db)
    assert {r["status"] for r in rows} == {"sent"}
    assert not [r for r in rows if r["delivery_key"].startswith("analysis:") and r["analysis_id"] != an.id]

    again = run_deliveries(get_settings())
    assert again["sent"] == 0 and again["alerts_queued"] == 0 and len(smtp.messages) == 3


def test_smtp_down_then_up_delivers_once(db, configure):
    port = free_port()  # nothing listens here yet
    configure(UNIRS_SMTP__HOST="127.0.0.1", UNIRS_SMTP__PORT=port, UNIRS_SMTP__TIMEOUT_SECONDS=5)
    with session_scope(get_settings()) as s:
        f.world(s, recipients=["ana@example.org"])
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


def test_5xx_is_permanent_4xx_is_retried_until_attempts_run_out(db, smtp, configure):
    configure(UNIRS_SMTP__MAX_ATTEMPTS=2)
    smtp.rcpt_replies = {"gone@example.org": "550 5.1.1 <gone@example.org>: no such user",
                         "busy@example.org": "451 4.3.0 mailbox busy, try later"}
    with session_scope(get_settings()) as s:
        f.world(s, recipients=["ana@example.org", "gone@example.org", "busy@example.org"])
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


def test_crash_after_the_server_accepted_never_sends_twice(db, smtp):
    """A worker process killed between SMTP acceptance and `mark_sent` (the one ambiguous window)."""
    with session_scope(get_settings()) as s:
        f.world(s, recipients=["ana@example.org"])
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


def test_outbox_crashes_resolve_exactly_once(db, configure, tmp_path, monkeypatch):
    """With an outbox the outcome is knowable: claimed-but-not-written is resent, written is marked sent."""
    with session_scope(get_settings()) as s:
        an = f.world(s, recipients=["ana@example.org", "bob@example.org"])
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
    bob_file = outbox / (ledger.message_id_for(f"analysis:{an.id}", "bob@example.org")[1:].split("@")[0] + ".eml")
    assert bob_file.exists() and len(list(outbox.glob("*.eml"))) == 1
    written = bob_file.stat().st_mtime_ns

    counts = run_deliveries(get_settings(), now=t0 + lease)
    assert counts["recovered_sent"] == 1 and counts["recovered_pending"] == 1 and counts["sent"] == 1
    assert {r["status"] for r in deliveries(db)} == {"sent"}
    assert len(list(outbox.glob("*.eml"))) == 2 and bob_file.stat().st_mtime_ns == written


def test_concurrent_runners_send_each_delivery_once(db, smtp):
    with session_scope(get_settings()) as s:
        for i in range(3):
            f.world(s, name=f"Forest {i}", recipients=["ana@example.org", "bob@example.org"])
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


def test_daily_digest_aggregates_the_period_with_a_health_section(db, smtp):
    now = datetime.now(UTC)
    with session_scope(get_settings()) as s:
        area = f.area(s, name="Daily forest", frequency="daily", recipients=["ana@example.org", "bob@example.org"])
        cat = f.catalogue(s)
        scenes = [f.scene(s, cat, datetime(2020, 8, day, 9, 40, tzinfo=UTC)) for day in (4, 9, 14, 19)]
        f.observe(s, area, scenes[0], 0.95)  # the last clear scene is years old: a health warning
        captions = ["Road extended by 400 m", "Second clear-cut to the east", "Regrowth on the old cut"]
        for i, caption in enumerate(captions):
            an = f.analysis(s, area, scenes[i + 1], scenes[i], finished_at=now - timedelta(hours=20 - i))
            f.findings(s, an, caption=caption)
        f.analysis(s, area, scenes[3], scenes[2], status="failed", finished_at=now - timedelta(hours=2),
                   last_error="COG read timed out: https://sentinel-cogs.example/B04.tif")
        # An immediate area's analysis is not part of this digest.
        f.world(s, name="Elsewhere", recipients=["zed@example.org"])

    counts = run_deliveries(get_settings(), now=now)
    assert counts["digests_created"] == 1 and counts["digest_deliveries_queued"] == 2
    digests = [(rcpt, m) for rcpt, m in smtp.parsed() if m["X-UniRS-Delivery"].startswith("digest:")]
    assert sorted(rcpt[0] for rcpt, _ in digests) == ["ana@example.org", "bob@example.org"]
    for _, msg in digests:
        assert "Daily forest daily digest" in msg["Subject"] and "3 analyses, 12.90 ha changed" in msg["Subject"]
        assert "(attention needed)" in msg["Subject"]
        p = parts_of(msg)
        for caption in captions:
            assert caption in p["html"] and caption in p["text"]
        assert "A new forest road" not in p["html"]  # the immediate area's analysis
        for fact in ("Pipeline health", "COG read timed out: https://sentinel-cogs.example/B04.tif",
                     "no clear scene", "2020-08-04", "1 failed"):
            assert fact in p["html"], fact
        assert "WARNING: none for 14+ days" in p["text"]
        assert len(p["images"]) == 9  # three detailed analyses × before/after/overlay
        for image in p["images"]:
            assert f'cid:{image["Content-ID"].strip("<>")}' in p["html"]
        fc = json.loads(p["attachments"][0].get_content())
        assert len(fc["features"]) == 6

    assert run_deliveries(get_settings(), now=now + timedelta(minutes=5))["digests_created"] == 0  # not due again yet
    later = run_deliveries(get_settings(), now=now + timedelta(hours=25))
    assert later["digests_created"] == 1 and later["sent"] == 2
    _, quiet = smtp.parsed()[-1]
    assert "0 analyses" in quiet["Subject"] and "No analysis finished in this period" in parts_of(quiet)["html"]


# ------------------------------------------------------------------------------ outbox and browser


def _outbox_run(db) -> list[Path]:
    with session_scope(get_settings()) as s:
        f.world(s, recipients=["ana@example.org"])
        f.world(s, name="Daily forest", frequency="daily", recipients=["ana@example.org"])
    assert run_deliveries(get_settings())["sent"] == 2
    return sorted(get_settings().smtp.outbox_dir.glob("*.eml"))


def test_outbox_writes_eml_and_browser_preview(db, configure):
    emls = _outbox_run(db)
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
def test_email_renders_in_headless_chromium(db, configure, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for eml in _outbox_run(db):
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


def test_claim_lease_runs_from_the_claim_not_from_the_start_of_a_slow_run(db):
    """A batch that started long ago (slow SMTP) must not hand out leases that are already expired: a
    concurrent runner would settle the row as "outcome unknown" while it is still being sent."""
    with session_scope(get_settings()) as s:
        f.world(s, recipients=["ana@example.org"])
    with session_scope(get_settings()) as s:
        create_immediate_deliveries(s, datetime.now(UTC), get_settings())
    run_started = datetime.now(UTC) - timedelta(hours=1)
    (row,) = deliveries(db)
    with session_scope(get_settings()) as s:
        claim = ledger.claim(s, row["id"], run_started, get_settings().smtp.lease_seconds)
    assert claim is not None
    with session_scope(get_settings()) as s:
        assert ledger.stale_sending(s, datetime.now(UTC)) == []
