"""Alert rules per area on the real Sentinel-2 sample: the pipeline runs in this process (real PostGIS,
the sample COGs over HTTP), then the real alert query and templates decide and word the alert.

2017-07-11 → 2018-08-25 is the demo's pair for 2018-08-25 (the latest clear date before it; 2017-08-30 is
17 % clear) and the one the issue names: most of its change is July → August greening (vegetation gain),
a small part a new cut. The figures below are this pair's spectral result at 10 m over the demo area;
gain must not alert (nor count in the subject) on an area that watches for loss.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from core.config import get_settings
from core.db import session_scope
from core.models import Area, Delivery, Finding
from monitor.reports.context import load_analysis_report
from monitor.reports.immediate import create_immediate_deliveries
from monitor.reports.render import render_alert
from tests.fixtures_workers import insert_analysis, insert_area, insert_sample_scenes, truncate
from workers.pipeline import run_analysis

AREA = "Romanian forest"


@pytest.fixture(scope="module")
def pair_2018(database_url, worker_settings, cog_server):
    truncate(database_url)
    scenes = insert_sample_scenes(worker_settings.catalogues[0], cog_server.url, ["2017-07-11", "2018-08-25"])
    area_id = insert_area(scenes.footprint.buffer(-0.0006), name=AREA)  # the demo area
    with session_scope(get_settings()) as s:
        s.get(Area, area_id).recipients = ["ana@example.org"]
    analysis_id = insert_analysis(area_id, scenes.ids["2018-08-25"], scenes.ids["2017-07-11"])
    assert run_analysis(analysis_id, "test-inprocess", worker_settings) == "done"
    return {"area_id": area_id, "analysis_id": analysis_id}


def _regions(analysis_id: int) -> dict[str, float]:
    with session_scope(get_settings()) as s:
        rows = s.execute(select(Finding.change_class, Finding.hectares)
                         .where(Finding.analysis_id == analysis_id, Finding.kind == "region")).all()
    out: dict[str, float] = {}
    for cls, ha in rows:
        out[cls] = round(out.get(cls, 0.0) + ha, 2)
    return out


def _alert(area_id: int, analysis_id: int, worker_settings, **area_changes) -> str | None:
    """Subject of the alert the area would get (None: no alert), from a clean delivery state."""
    with session_scope(get_settings()) as s:
        s.query(Delivery).delete()
        area = s.get(Area, area_id)
        for key, value in area_changes.items():
            setattr(area, key, value)
    with session_scope(get_settings()) as s:
        created = create_immediate_deliveries(s, datetime.now(UTC), worker_settings)
    if not created:
        return None
    with session_scope(get_settings()) as s:
        report = load_analysis_report(s, analysis_id, "https://www.openstreetmap.org")
    return render_alert(report, "ana@example.org").subject


def test_findings_keep_gain_and_loss(pair_2018):
    assert _regions(pair_2018["analysis_id"]) == {"vegetation_gain": 1.3, "vegetation_loss": 0.25}


def test_default_rule_alerts_on_loss_only_and_the_subject_counts_only_loss(pair_2018, worker_settings):
    with session_scope(get_settings()) as s:
        assert s.get(Area, pair_2018["area_id"]).alert_classes == ["new_built_up_or_bare", "vegetation_loss"]
    subject = _alert(pair_2018["area_id"], pair_2018["analysis_id"], worker_settings)
    assert subject == "Forest loss 0.25 ha — Romanian forest — 2018-08-25"


def test_minimum_area_counts_alerting_hectares_not_all_change(pair_2018, worker_settings):
    # 1.55 ha changed in all, but only 0.25 ha of it is loss: a 0.5 ha minimum sends nothing.
    assert _alert(pair_2018["area_id"], pair_2018["analysis_id"], worker_settings, min_alert_hectares=0.5) is None


def test_gain_alerts_only_when_the_area_asks_for_it(pair_2018, worker_settings):
    only_gain = _alert(pair_2018["area_id"], pair_2018["analysis_id"], worker_settings,
                       alert_classes=["vegetation_gain"], min_alert_hectares=0.2)
    assert only_gain == "Vegetation gain 1.30 ha — Romanian forest — 2018-08-25"
    both = _alert(pair_2018["area_id"], pair_2018["analysis_id"], worker_settings,
                  alert_classes=["new_built_up_or_bare", "vegetation_loss", "vegetation_gain"])
    assert both == "Vegetation gain 1.30 ha, forest loss 0.25 ha — Romanian forest — 2018-08-25"
