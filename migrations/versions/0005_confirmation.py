"""Confirmation and re-detection: findings.alert_state / first_finding_id / state_changed_at, areas.alert_on

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 11:00:00

Region findings become ``probable`` on first detection and ``confirmed`` or ``dismissed`` when the next
clear acquisition is looked at; a region re-detected on a later pair is ``redetected`` and points at the
change's first finding. Areas choose to be alerted on ``probable`` (default) or only on ``confirmed``.
Existing region findings keep a NULL state (treated as probable; nothing is re-sent: their alerts were
delivered already).
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("areas", sa.Column("alert_on", sa.Text(), nullable=False, server_default=sa.text("'probable'")))
    op.create_check_constraint("ck_areas_alert_on", "areas", "alert_on IN ('probable', 'confirmed')")
    op.add_column("findings", sa.Column("alert_state", sa.Text(), nullable=True))
    op.add_column("findings", sa.Column("first_finding_id", sa.BigInteger(), nullable=True))
    op.add_column("findings", sa.Column("state_changed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_foreign_key("findings_first_finding_id_fkey", "findings", "findings", ["first_finding_id"], ["id"],
                          ondelete="SET NULL")
    op.create_index("ix_findings_area_state", "findings", ["area_id", "alert_state"],
                    postgresql_where=sa.text("kind = 'region'"))


def downgrade() -> None:
    op.drop_index("ix_findings_area_state", table_name="findings")
    op.drop_constraint("findings_first_finding_id_fkey", "findings", type_="foreignkey")
    op.drop_column("findings", "state_changed_at")
    op.drop_column("findings", "first_finding_id")
    op.drop_column("findings", "alert_state")
    op.drop_constraint("ck_areas_alert_on", "areas", type_="check")
    op.drop_column("areas", "alert_on")
