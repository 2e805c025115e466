"""observations per (area, acquisition): covered and clear fractions kept apart, a per-area minimum coverage

Revision ID: 0008
Revises: 0013
Create Date: 2026-12-02 15:20:00

An observation was one granule over one area, so an area in the overlap of two tiles had two of them
(two analyses, two alerts per datatake) and an area across a tile edge counted the other tile's pixels as
cloud. Now an observation is the whole acquisition (the mosaic of its granules) over the area:

- ``observations`` is keyed by ``(area_id, acquisition_id)``; ``scene_id`` stays as the granule that
  imaged the area first (labels, links), nullable;
- ``covered_fraction`` = imaged pixels / area pixels (NULL on rows written before it was measured);
  ``clear_fraction`` = clear pixels / imaged pixels from now on (older rows counted clear / area pixels,
  never more than the new figure, so they are kept as they are: conservative, not wrong in the unsafe way);
- a new status ``partial``: the acquisition imaged too little of the area (not cloud);
- ``areas.min_covered_fraction`` (default 0.5).

Existing rows of one (area, acquisition) merge into one: the best settled one wins (clear, then pending,
cloudy, failed; then the higher clear fraction), so nothing already analysed becomes pending again.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TYPE observation_status ADD VALUE IF NOT EXISTS 'partial'")
    op.add_column('areas', sa.Column('min_covered_fraction', sa.Float(), server_default=sa.text('0.5'),
                                     nullable=False))
    op.add_column('observations', sa.Column('acquisition_id', sa.BigInteger(), nullable=True))
    op.add_column('observations', sa.Column('covered_fraction', sa.Float(), nullable=True))
    op.execute("UPDATE observations o SET acquisition_id = s.acquisition_id FROM scenes s WHERE s.id = o.scene_id")
    op.execute("""
        DELETE FROM observations o USING (
            SELECT area_id, scene_id, row_number() OVER (
                       PARTITION BY area_id, acquisition_id
                       ORDER BY CASE status::text WHEN 'clear' THEN 0 WHEN 'pending' THEN 1 WHEN 'cloudy' THEN 2
                                                  ELSE 3 END,
                                clear_fraction DESC NULLS LAST, scene_id) AS rank
              FROM observations) ranked
         WHERE ranked.rank > 1 AND o.area_id = ranked.area_id AND o.scene_id = ranked.scene_id
    """)
    op.drop_constraint('observations_pkey', 'observations', type_='primary')
    op.alter_column('observations', 'acquisition_id', nullable=False)
    op.alter_column('observations', 'scene_id', nullable=True)
    op.create_primary_key('observations_pkey', 'observations', ['area_id', 'acquisition_id'])
    op.create_foreign_key('observations_acquisition_id_fkey', 'observations', 'acquisitions', ['acquisition_id'],
                          ['id'], ondelete='CASCADE')


def downgrade() -> None:
    # Back to one row per granule: the representative granule keeps the row (others are not recreated).
    op.execute("DELETE FROM observations WHERE scene_id IS NULL")
    op.drop_constraint('observations_acquisition_id_fkey', 'observations', type_='foreignkey')
    op.drop_constraint('observations_pkey', 'observations', type_='primary')
    op.alter_column('observations', 'scene_id', nullable=False)
    op.create_primary_key('observations_pkey', 'observations', ['area_id', 'scene_id'])
    op.drop_column('observations', 'covered_fraction')
    op.drop_column('observations', 'acquisition_id')
    op.drop_column('areas', 'min_covered_fraction')
    # PostgreSQL cannot drop an enum value: rebuild the type without 'partial' (those rows become cloudy,
    # the nearest older meaning).
    op.execute("UPDATE observations SET status = 'cloudy' WHERE status = 'partial'")
    op.execute("ALTER TABLE observations ALTER COLUMN status TYPE text")
    op.execute("DROP TYPE observation_status")
    op.execute("CREATE TYPE observation_status AS ENUM ('pending', 'clear', 'cloudy', 'failed')")
    op.execute("ALTER TABLE observations ALTER COLUMN status TYPE observation_status "
               "USING status::observation_status")
