"""Time-series screen: findings.screen_verdict

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 15:45:00

Each region finding records the verdict of the time-series screen (``workers/screen.py``): ``departure``
(the change departs from the area's seasonal history), ``seasonal`` (what the season does: never alerted,
never a link target for later re-detections) or ``unscreened`` (no NDVI class, no clear pixel). Existing
rows keep NULL: they were written before the screen and their alerts were delivered already.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("findings", sa.Column("screen_verdict", sa.Text(), nullable=True))
    op.create_check_constraint("ck_findings_screen_verdict", "findings",
                               "screen_verdict IN ('departure', 'seasonal', 'unscreened')")


def downgrade() -> None:
    op.drop_constraint("ck_findings_screen_verdict", "findings", type_="check")
    op.drop_column("findings", "screen_verdict")
