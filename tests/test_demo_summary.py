"""The end of `scripts/demo`: a few lines about the findings (counts by kind, regions by class with
hectares and alert states) instead of all ~90 of them (real PostGIS)."""

from __future__ import annotations

from shapely.geometry import box
from sqlalchemy import update

from core.db import session_scope
from core.models import Finding
from devtools.demo import AREA_NAME, findings_summary
from tests import factories


def test_summary_counts_kinds_classes_and_alert_states(db):
    regions = [(box(23.12, 46.52, 23.13, 46.525), "vegetation_loss", 3.2),
               (box(23.13, 46.52, 23.14, 46.525), "vegetation_loss", 1.3),
               (box(23.14, 46.52, 23.15, 46.525), "vegetation_gain", 7.0),
               (box(23.15, 46.55, 23.152, 46.556), "new_built_up_or_bare", 1.1)]
    with session_scope(db) as session:
        an = factories.world(session, name=AREA_NAME, regions=regions)
        session.execute(update(Finding).where(Finding.analysis_id == an.id, Finding.kind == "region",
                                              Finding.hectares.in_([3.2, 7.0])).values(alert_state="confirmed"))
        session.execute(update(Finding).where(Finding.analysis_id == an.id, Finding.hectares == 1.3)
                        .values(alert_state="probable"))
        factories.world(session, name="another area")  # not counted
    assert findings_summary(db, AREA_NAME) == [
        "7 findings: 4 region, 2 answer, 1 summary",
        "changed regions by class: regions, hectares (alert states)",
        "  new_built_up_or_bare    1      1.10 ha   (1 unsettled)",
        "  vegetation_loss         2      4.50 ha   (1 confirmed, 1 probable)",
        "  vegetation_gain         1      7.00 ha   (1 confirmed)",
    ]


def test_summary_of_no_findings(db):
    assert findings_summary(db, AREA_NAME) == ["no findings"]
