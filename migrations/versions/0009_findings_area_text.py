"""findings: area + text search from one index per text column

Revision ID: 0009
Revises: 0012
Create Date: 2026-12-02 15:20:00

``findings --area A --text W`` wants the newest matches of W in one area. With trigram GIN indexes on
caption and answer alone, every step of the text search (monitor/findings.py) fetched the matches of W
in *all* areas (25,000 rows for a word in 0.5 % of 5 M findings) and intersected them with the area's
rows. GIN indexes on (area_id, caption) and (area_id, answer) — ``btree_gin`` supplies the integer
operator class — intersect inside the index and return only that area's matches. A multicolumn GIN
index serves a condition on any subset of its columns equally well, so they replace the caption-only
and answer-only trigram indexes (text search without an area uses them the same way).
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0009'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Trusted contrib extension since PostgreSQL 13: the database owner may create it.
    op.execute("CREATE EXTENSION IF NOT EXISTS btree_gin")
    op.drop_index('ix_findings_caption_trgm', table_name='findings', postgresql_using='gin')
    op.drop_index('ix_findings_answer_trgm', table_name='findings', postgresql_using='gin')
    op.create_index('ix_findings_area_caption_trgm', 'findings', ['area_id', 'caption'], unique=False,
                    postgresql_using='gin', postgresql_ops={'caption': 'gin_trgm_ops'})
    op.create_index('ix_findings_area_answer_trgm', 'findings', ['area_id', 'answer'], unique=False,
                    postgresql_using='gin', postgresql_ops={'answer': 'gin_trgm_ops'})


def downgrade() -> None:
    op.drop_index('ix_findings_area_answer_trgm', table_name='findings', postgresql_using='gin')
    op.drop_index('ix_findings_area_caption_trgm', table_name='findings', postgresql_using='gin')
    op.create_index('ix_findings_caption_trgm', 'findings', ['caption'], unique=False, postgresql_using='gin',
                    postgresql_ops={'caption': 'gin_trgm_ops'})
    op.create_index('ix_findings_answer_trgm', 'findings', ['answer'], unique=False, postgresql_using='gin',
                    postgresql_ops={'answer': 'gin_trgm_ops'})
