"""findings: index on first_finding_id (re-detections of a change)

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-03 17:00:00

The alert rule (monitor/reports/immediate.py ``region_alerts_sql``) asks, for every region finding it
weighs, whether another finding of the same change (``first_finding_id`` = the change's first finding) was
already alerted. Without an index on ``first_finding_id`` that lookup read every finding of the area;
deleting a finding also scanned all findings for the ON DELETE SET NULL of this foreign key. Partial
(``first_finding_id IS NOT NULL``): only re-detections carry one, and only they are looked up.

Built CONCURRENTLY, outside the migration's transaction, like revision 0015: writers of findings are not
locked out during the build, and an interrupted build (an INVALID index) is dropped and rebuilt, so
re-running ``db upgrade`` is safe.
"""
from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = '0021'
down_revision: str | None = '0020'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_findings_first_finding"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        invalid = bind.execute(text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
                               {"name": INDEX}).scalar()
        if invalid:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
        op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} ON findings (first_finding_id) "
                   "WHERE first_finding_id IS NOT NULL")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
