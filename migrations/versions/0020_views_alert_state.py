"""QGIS views: alert_state and screen_verdict on v_findings and v_change_regions

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-03 12:40:00

A region's alert state (probable | confirmed | dismissed | redetected | seasonal | atmospheric,
workers/confirmation.py) and the time-series screen's verdict (departure | seasonal | atmospheric |
unscreened, workers/screen.py) were in ``findings`` but not in the views, so QGIS drew a cloud edge
(atmospheric) like any loss. ``CREATE OR REPLACE VIEW`` may only append columns: both go last, every
existing column keeps its place, and the geometry expression of v_change_regions stays the one
ix_findings_region_geom indexes.
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0020'
down_revision: str | None = '0019'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

V_FINDINGS = """
SELECT f.id, f.analysis_id, f.area_id, a.name AS area_name, f.kind, f.change_class, f.hectares,
       f.caption, f.question, f.answer, f.confidence, f.statistics, f.analyser_name, f.analyser_version,
       f.observed_at, f.before_observed_at, f.created_at, f.geom{extra}
FROM findings f
JOIN areas a ON a.id = f.area_id
"""

V_CHANGE_REGIONS = """
SELECT f.id, f.analysis_id, f.area_id, a.name AS area_name, f.change_class, f.hectares, f.confidence,
       f.caption,
       (SELECT s.caption FROM findings s
         WHERE s.analysis_id = f.analysis_id AND s.kind = 'summary' ORDER BY s.ordinal LIMIT 1) AS analysis_caption,
       f.observed_at, f.before_observed_at, an.pair_reason, f.analyser_name, f.analyser_version,
       (ST_Multi(ST_CollectionExtract(f.geom, 3))::geometry(MultiPolygon, 4326)) AS geom{extra}
FROM findings f
JOIN areas a ON a.id = f.area_id
JOIN analyses an ON an.id = f.analysis_id
WHERE f.kind = 'region' AND f.geom IS NOT NULL AND ST_Dimension(f.geom) = 2
"""

STATES = ", f.alert_state, f.screen_verdict"


def upgrade() -> None:
    op.execute("CREATE OR REPLACE VIEW v_findings AS" + V_FINDINGS.format(extra=STATES))
    op.execute("CREATE OR REPLACE VIEW v_change_regions AS" + V_CHANGE_REGIONS.format(extra=STATES))


def downgrade() -> None:
    # A view's columns cannot be dropped by CREATE OR REPLACE: recreate revision 0002's.
    op.execute("DROP VIEW v_change_regions")
    op.execute("DROP VIEW v_findings")
    op.execute("CREATE VIEW v_findings AS" + V_FINDINGS.format(extra=""))
    op.execute("CREATE VIEW v_change_regions AS" + V_CHANGE_REGIONS.format(extra=""))
