"""Time-series screen: verdict 'atmospheric' (findings.screen_verdict)

Revision ID: 0013
Revises: 0011
Create Date: 2026-12-02 16:20:00

A region whose NDVI fell although its ground does not look bare (as flat a brightening as haze or thin
cloud, or a shadow's darkening: what the cloud mask missed) is ``atmospheric`` and never alerts.
"""
from collections.abc import Sequence

from alembic import op

revision: str = '0013'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("ck_findings_screen_verdict", "findings", type_="check")
    op.create_check_constraint("ck_findings_screen_verdict", "findings",
                               "screen_verdict IN ('departure', 'seasonal', 'unscreened', 'atmospheric')")


def downgrade() -> None:
    op.execute("UPDATE findings SET screen_verdict = 'seasonal' WHERE screen_verdict = 'atmospheric'")
    op.drop_constraint("ck_findings_screen_verdict", "findings", type_="check")
    op.create_check_constraint("ck_findings_screen_verdict", "findings",
                               "screen_verdict IN ('departure', 'seasonal', 'unscreened')")
