"""Messages sent again and again that no worker ever starts back off: observations.dispatches, analyses.dispatches

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03 06:40:00

``dispatches``: how many times the row's task was published since a worker last started it (an observation's
``begin``, an analysis's claim reset it). ``attempts`` counts only starts, so a message lost before any worker
took it — or sent to a queue no worker consumes — was re-sent every 10 min (observations) or 2 × lease
(analyses) without end. Each send without a start doubles the delay before the next, up to
``analysis.resend_backoff_max_seconds`` (core/observations.py, core/jobs.py); doctor reports such rows.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0017'
down_revision: str | None = '0016'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("observations", sa.Column("dispatches", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("analyses", sa.Column("dispatches", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("analyses", "dispatches")
    op.drop_column("observations", "dispatches")
