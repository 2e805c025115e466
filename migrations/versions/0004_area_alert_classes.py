"""areas.alert_classes: which change classes alert (default the loss classes)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:40:00

Existing areas get the loss classes (vegetation loss, new built-up land or bare ground): gain and water
change stay in the findings and the email body but no longer send an alert on their own.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("areas", sa.Column(
        "alert_classes", postgresql.ARRAY(sa.Text()), nullable=False,
        server_default=sa.text("'{new_built_up_or_bare,vegetation_loss}'::text[]"),
    ))


def downgrade() -> None:
    op.drop_column("areas", "alert_classes")
