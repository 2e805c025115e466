"""Observations computed by cpu workers: observations.dispatched_at

Revision ID: 0014
Revises: 0008
Create Date: 2026-12-02 19:40:00

When the ``unirs.observe`` task of a row's acquisition was last sent (core/observations.py): a due row whose
stamp is old is sent again (a lost message or a killed worker loses nothing).
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0014'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("observations", sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("observations", "dispatched_at")
