"""findings: text search newest first from one (observed_at, trigram) GiST index

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02 20:20:00

``findings --text W`` without an area wants the newest 100 matches of W among all findings. The trigram
GIN indexes can only return every match of W (25,000 for a word in 0.5 % of 5 M findings) as a bitmap,
which was then intersected with a time window: ~50 ms warm, 79-95 ms p95 here. A GiST index on
(observed_at, caption + ' ' + answer) — btree_gist for the time, pg_trgm's gist_trgm_ops for the text —
is walked in observed_at order (KNN: ``observed_at <-> '9999-12-31'``), testing each entry's trigrams in
the index, so the newest matches come first and the walk stops after 100 of them (a few ms). The
expression must stay exactly ``monitor.findings.SEARCH_TEXT``, or the planner cannot use the index.

Built CONCURRENTLY, outside the migration's transaction: a plain CREATE INDEX holds a SHARE lock on
findings for the whole build (~5 min at 5 M rows), during which no worker can write a finding. A build
that was interrupted leaves an INVALID index behind; it is dropped and rebuilt, so re-running
``db upgrade`` is safe.
"""
from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = '0015'
down_revision: str | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_findings_observed_text_trgm"


def upgrade() -> None:
    # pg_trgm and btree_gist: revision 0002.
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        invalid = bind.execute(text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
                               {"name": INDEX}).scalar()
        if invalid:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
        op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} ON findings USING gist "
                   "(observed_at, (coalesce(caption, '') || ' ' || coalesce(answer, '')) gist_trgm_ops)")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
