"""The whole loop with real processes: a local STAC API, the scheduler and a Celery worker as subprocesses,
real Sentinel-2 acquisitions published one by one; asserts the findings in PostGIS and the alert email.

Five dates cover every outcome: the first scene (nothing to compare with), a cloudy scene (skipped with its
reason), a no-change pair (findings, no alert), the 2016 → 2017 clear-cuts (findings and one alert email),
and a second no-change pair five days later.
"""

from __future__ import annotations

import email
from email import policy

import psycopg
import pytest

from devtools import dbadmin
from devtools.demo import AREA_NAME, RECIPIENT, run_demo

DATES = ["2015-08-31", "2016-08-15", "2016-08-25", "2017-07-06", "2017-07-11"]


@pytest.fixture
def demo_result(database_url, tmp_path):
    result = run_demo(database_url, var_dir=tmp_path / "demo", dates=DATES, per_date_timeout=240, echo=print)
    yield result
    base = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    for suffix in ("_demo", "_demo_stac"):
        dbadmin.drop_database(dbadmin.with_dbname(base, dbadmin.dbname(base) + suffix))


def test_whole_loop_publish_to_email(demo_result, record_property):
    by_date = {d.date: d for d in demo_result.dates}
    assert list(by_date) == DATES

    first = by_date["2015-08-31"]
    assert first.observation == "clear" and first.analysis_status is None
    assert "no earlier clear acquisition" in first.reason

    cloudy = by_date["2016-08-25"]
    assert cloudy.observation == "cloudy" and cloudy.analysis_status is None
    assert "below the area's minimum" in cloudy.reason

    for quiet in ("2016-08-15", "2017-07-11"):
        d = by_date[quiet]
        assert d.analysis_status == "done" and d.changed_hectares < 0.5
        assert d.seconds_to_email is None  # below the area's 0.5 ha threshold: no alert

    cut = by_date["2017-07-06"]
    assert cut.analysis_status == "done"
    assert "2016-08-15" in cut.pair_reason
    assert cut.changed_hectares > 1.0
    assert cut.seconds_to_email is not None and cut.seconds_to_email > 0
    record_property("publish_to_email_seconds", round(cut.seconds_to_email, 2))
    print(f"publish → email: {cut.seconds_to_email:.1f} s")

    # Findings in PostGIS: the regions add up to the summary, lie inside the area, and are vegetation loss.
    with psycopg.connect(demo_result.app_url.replace("+psycopg", "")) as conn:
        rows = conn.execute(
            """SELECT f.kind, f.change_class, f.hectares, ST_Within(f.geom, ST_Buffer(a.geom, 0.0001))
               FROM findings f JOIN areas a ON a.id = f.area_id
               JOIN analyses an ON an.id = f.analysis_id JOIN scenes s ON s.id = an.after_scene_id
               WHERE s.acquired_at::date = '2017-07-06' AND f.kind IN ('summary', 'region')""",
        ).fetchall()
    regions = [r for r in rows if r[0] == "region"]
    summary = [r for r in rows if r[0] == "summary"]
    assert len(summary) == 1 and regions
    assert sum(r[2] for r in regions) == pytest.approx(summary[0][2], abs=0.02)
    assert all(r[3] for r in regions)
    assert {r[1] for r in regions} >= {"vegetation_loss"}

    # Exactly one alert email, to the area's recipient, with the evidence attached.
    emails = sorted(demo_result.outbox.glob("**/*.eml"))
    assert len(emails) == 1
    msg = email.message_from_bytes(emails[0].read_bytes(), policy=policy.default)
    assert msg["To"] == RECIPIENT
    assert AREA_NAME in msg["Subject"] and "ha" in msg["Subject"]
    # the demo's line names the alert by the subject's own figure (loss only), not the changed total
    assert cut.headline.startswith("Forest loss ") and msg["Subject"].startswith(f"{cut.headline} — ")
    parts = list(msg.walk())
    assert sum(p.get_content_type() == "image/png" for p in parts) == 3  # before, after, overlay
    assert any(p.get_filename() and p.get_filename().endswith(".geojson") for p in parts)
    html = next(p for p in parts if p.get_content_type() == "text/html").get_content()
    assert "2016-08-15" in html and "2017-07-06" in html
