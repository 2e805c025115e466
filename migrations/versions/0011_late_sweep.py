"""late sweep state per catalogue × collection: publication-time cursor, last sweep, detected mode, late items

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 15:40:00

The late sweep (``monitor/catalogues/late.py``) finds items published more than the look-back after they
were sensed. ``late_cursor`` is the publication time it has read up to, ``late_swept_at`` when it last
completed, ``late_mode`` how it searched (``updated``/``created``: filtered on that publication-time
property; ``deep``: re-read by sensing time), ``late_items`` how many late granules were stored (the
``unirs_late_items_total`` counter). Existing rows start with no sweep done and no late items.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('poll_states', sa.Column('late_cursor', sa.DateTime(timezone=True), nullable=True))
    op.add_column('poll_states', sa.Column('late_swept_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('poll_states', sa.Column('late_mode', sa.Text(), nullable=True))
    op.add_column('poll_states', sa.Column('late_items', sa.BigInteger(), nullable=False, server_default='0'))


def downgrade() -> None:
    for column in ('late_items', 'late_mode', 'late_swept_at', 'late_cursor'):
        op.drop_column('poll_states', column)
