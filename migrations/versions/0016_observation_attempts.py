"""Observation tasks that keep failing give up: observations.attempts, observations.started_at

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02 22:30:00

``attempts``: how many times a worker (or the scheduler's own process) started computing the row since its
last stored outcome; after ``analysis.observation_max_attempts`` of them without one (the task raised, or its
worker died) the row is settled ``failed`` and pairing moves on (core/observations.py). ``started_at``: when
the last of those attempts started — the re-send delay runs from it, not only from the dispatch, so a message
that waited long in a busy ``cpu`` queue is not sent again while it runs.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0016'
down_revision: str | None = '0015'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("observations", sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("observations", sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("observations", "started_at")
    op.drop_column("observations", "attempts")
