"""findings views for QGIS, and the indexes of the findings query

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 10:00:00

- ``v_findings``: every finding with its area's name (geometry column typed GEOMETRY, EPSG:4326; answers
  have no geometry).
- ``v_change_regions``: the changed regions only, typed MultiPolygon so QGIS opens the layer without
  asking, with the analysis caption and the pair reason for the identify tool.
- trigram GIN indexes on caption and answer: ``findings --text`` is ILIKE '%…%', which a btree cannot serve.
- GiST (geom, observed_at) instead of GiST (geom): place + time window in one index scan.
- a GiST index on exactly the view's geometry expression, so QGIS's extent filter on ``v_change_regions``
  (``geom && <canvas box>``) uses an index instead of computing ST_Multi for every finding.
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The view's geometry expression and the index expression (and core/models/analysis.py) must stay identical:
# the planner uses the index only for exactly the indexed expression.

V_FINDINGS = """
CREATE VIEW v_findings AS
SELECT f.id, f.analysis_id, f.area_id, a.name AS area_name, f.kind, f.change_class, f.hectares,
       f.caption, f.question, f.answer, f.confidence, f.statistics, f.analyser_name, f.analyser_version,
       f.observed_at, f.before_observed_at, f.created_at, f.geom
FROM findings f
JOIN areas a ON a.id = f.area_id
"""

V_CHANGE_REGIONS = """
CREATE VIEW v_change_regions AS
SELECT f.id, f.analysis_id, f.area_id, a.name AS area_name, f.change_class, f.hectares, f.confidence,
       f.caption,
       (SELECT s.caption FROM findings s
         WHERE s.analysis_id = f.analysis_id AND s.kind = 'summary' ORDER BY s.ordinal LIMIT 1) AS analysis_caption,
       f.observed_at, f.before_observed_at, an.pair_reason, f.analyser_name, f.analyser_version,
       (ST_Multi(ST_CollectionExtract(f.geom, 3))::geometry(MultiPolygon, 4326)) AS geom
FROM findings f
JOIN areas a ON a.id = f.area_id
JOIN analyses an ON an.id = f.analysis_id
WHERE f.kind = 'region' AND f.geom IS NOT NULL AND ST_Dimension(f.geom) = 2
"""


def upgrade() -> None:
    # pg_trgm and btree_gist ship with PostgreSQL (contrib); creating them needs a superuser or a
    # trusted-extension grant (both are trusted since PostgreSQL 13: the database owner may create them).
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    op.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
    # Replaces the geometry-only GiST: it serves geometry-only filters too, and "box + time window" becomes
    # one index scan instead of a BitmapAnd with a large observed_at range.
    op.drop_index('ix_findings_geom', table_name='findings', postgresql_using='gist')
    op.create_index('ix_findings_geom_observed', 'findings', ['geom', 'observed_at'], unique=False,
                    postgresql_using='gist')
    op.create_index('ix_findings_caption_trgm', 'findings', ['caption'], unique=False, postgresql_using='gin',
                    postgresql_ops={'caption': 'gin_trgm_ops'})
    op.create_index('ix_findings_answer_trgm', 'findings', ['answer'], unique=False, postgresql_using='gin',
                    postgresql_ops={'answer': 'gin_trgm_ops'})
    op.execute("CREATE INDEX ix_findings_region_geom ON findings USING gist "
               "((ST_Multi(ST_CollectionExtract(geom, 3))::geometry(MultiPolygon, 4326))) "
               "WHERE kind = 'region' AND geom IS NOT NULL AND ST_Dimension(geom) = 2")
    op.execute(V_FINDINGS)
    op.execute(V_CHANGE_REGIONS)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS v_change_regions")
    op.execute("DROP VIEW IF EXISTS v_findings")
    op.execute("DROP INDEX IF EXISTS ix_findings_region_geom")
    op.drop_index('ix_findings_answer_trgm', table_name='findings', postgresql_using='gin')
    op.drop_index('ix_findings_caption_trgm', table_name='findings', postgresql_using='gin')
    op.drop_index('ix_findings_geom_observed', table_name='findings', postgresql_using='gist')
    op.create_index('ix_findings_geom', 'findings', ['geom'], unique=False, postgresql_using='gist')
    # The extensions stay: other objects (or a later revision) may use them, and they hold no data.
