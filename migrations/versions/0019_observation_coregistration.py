"""Where each acquisition lies against its area's geometry: observations.coregistration

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-03 11:30:00

``coregistration`` (JSONB, NULL until an analysis reads the acquisition): ``{"status": "estimated" |
"anchor" | "fallback", "position_px": [rows, cols] | null, "shift_px": [rows, cols], "applied_px": [rows,
cols], "offset_m": [east, north], "pixel_size_m": 10.0, "pairs": n, "spread_px": [rows, cols] | null,
"reason": text | null, "method": text, "dropped": [{"item_id": text, "reason": text}], "item_ids": [text]}``
(``dropped``: references left out because they could not be read or were upgraded since; ``item_ids``: the
acquisition's items the record was estimated on, so a product upgraded since is registered again) — set
once by workers/coregistration.py; every later read of the acquisition for the area is moved by
``offset_m`` (pre-2021 Sentinel-2A and 2B products are up to a pixel apart).
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = '0019'
down_revision: str | None = '0018'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("observations", sa.Column("coregistration", JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("observations", "coregistration")
