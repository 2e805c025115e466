"""Alert emails' content: headers always one safe line, hostile names and model text escaped, every empty
state of a sparse analysis, the outbox's .eml and browser preview, and the layout in a real headless browser."""

from __future__ import annotations

import email
import json
import subprocess
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sqlalchemy import select

from core.config import get_settings
from core.db import session_scope
from core.models import Analysis, Finding
from devtools.browser import LOOPBACK_ONLY_FLAGS
from monitor.reports import ledger, run_deliveries
from monitor.reports.context import agreement, load_analysis_report, osm_link
from monitor.reports.message import build_message
from monitor.reports.render import ATTRIBUTION, RenderedEmail, render_alert
from monitor.reports.sanitize import header_text
from tests import factories as f
from tests.fixtures_mail import ARTIFACTS, CHROMIUM, SENDER, parts_of, world
from tests.fixtures_reports import insert_worker_world


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
            [str(CHROMIUM), "--headless", "--disable-gpu", "--disable-quic", *LOOPBACK_ONLY_FLAGS,
             f"--user-data-dir={tmp_path / 'chromium'}", f"--screenshot={png}", "--window-size=800,1400",
             eml.with_suffix(".html").as_uri()],
            check=True, timeout=120, capture_output=True,
        )
        with Image.open(png) as shot:
            assert shot.size == (800, 1400)
            colours = shot.convert("RGB").getcolors(maxcolors=1_000_000)
            assert colours is not None and len(colours) > 50  # text and thumbnails, not a blank page


def _two_class_analysis(name: str, second_class: str, before_at: datetime, after_at: datetime) -> Analysis:
    """An analysis of a new area with 3.20 ha of vegetation loss and 1.10 ha of ``second_class``."""
    from shapely.geometry import box

    with session_scope(get_settings()) as s:
        area = f.area(s, name=name)
        cat = f.catalogue(s)
        before = f.scene(s, cat, before_at.replace(tzinfo=UTC))
        after = f.scene(s, cat, after_at.replace(tzinfo=UTC))
        an = f.analysis(s, area, after, before)
        f.findings(s, an, regions=[(box(23.12, 46.52, 23.13, 46.525), "vegetation_loss", 3.2),
                                   (box(23.15, 46.55, 23.152, 46.556), second_class, 1.1)])
    return an


def test_plain_text_lists_each_class_on_its_own_line(db, configure):
    """trim_blocks ate the newline after a class line's closing ``{% endif %}``: "- vegetation loss: 3.20 ha (1
    region(s))  - vegetation gain: …" ran together on one line in alert.txt (and the digest's list)."""
    an = _two_class_analysis("Two classes", "vegetation_gain", datetime(2021, 6, 1), datetime(2021, 7, 1))
    with session_scope(get_settings()) as s:
        report = load_analysis_report(s, an.id, "https://maps.example.org/")
    text = render_alert(report, "ana@example.org").text
    listed = text.split("Changed area by class\n", 1)[1].split("\n\n", 1)[0]
    assert listed.splitlines() == ["  - vegetation loss: 3.20 ha (1 region(s))",
                                   "  - vegetation gain: 1.10 ha (1 region(s)), reported only"]


def test_a_watched_class_none_of_whose_regions_alert_is_not_listed_as_alerting(db, configure):
    """A loss region the time-series screen called seasonal: the class is one the area alerts on, but
    nothing of it alerted; the class table said "alerts" beside it (and the webhook "alerts": true)."""
    from sqlalchemy import update

    from monitor.reports.webhooks import event_body

    an = _two_class_analysis("Screened", "new_built_up_or_bare", datetime(2018, 4, 12), datetime(2018, 11, 8))
    with session_scope(get_settings()) as s:
        s.execute(update(Finding).where(Finding.analysis_id == an.id, Finding.change_class == "vegetation_loss")
                  .values(alert_state="seasonal", screen_verdict="seasonal"))
    with session_scope(get_settings()) as s:
        report = load_analysis_report(s, an.id, "https://maps.example.org/")
    assert report.headline == "Forest loss 1.10 ha"
    assert [(c.change_class, c.alerts, c.watched) for c in report.classes] == [
        ("new_built_up_or_bare", True, True), ("vegetation_loss", False, True)]
    email = render_alert(report, "ana@example.org")
    listed = email.text.split("Changed area by class\n", 1)[1].split("\n\n", 1)[0]
    assert listed.splitlines() == [
        "  - new built-up land or bare ground: 1.10 ha (1 region(s))",
        "  - vegetation loss: 3.20 ha (1 region(s)), not alerted (screened out or seen before)"]
    assert ">not alerted (screened out or seen before)</td>" in email.html
    with session_scope(get_settings()) as s:
        classes = json.loads(event_body(s, an.id, get_settings()))["data"]["classes"]
    assert [(c["change_class"], c["alerts"], c["watched"]) for c in classes] == [
        ("new_built_up_or_bare", True, True), ("vegetation_loss", False, True)]
