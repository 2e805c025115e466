"""Where a thumbnail lies on the ground: finding_images.bounds

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-03 07:00:00

``bounds`` (JSONB, NULL for images stored before): ``{"crs": "EPSG:32634", "bbox": [minx, miny, maxx, maxy],
"map_height_px": h}`` — the top ``h`` rows of the PNG (the map part; the rest is the legend strip of
workers/mapframe.py) cover ``bbox`` in ``crs``, the thumbnail grid. The analysis page places the before/after
chips on its map from it, exactly (reprojected to Web Mercator by the web app), not as framed pictures.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = '0018'
down_revision: str | None = '0017'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("finding_images", sa.Column("bounds", JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("finding_images", "bounds")
