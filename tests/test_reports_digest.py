"""The daily digest: everything found over an area in the period, with a health section (real SMTP server)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from core.config import get_settings
from core.db import session_scope
from core.models import Analysis, AnalysisStatus
from monitor.reports import run_deliveries
from tests.fixtures_mail import parts_of
from tests.fixtures_reports import insert_worker_world


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
