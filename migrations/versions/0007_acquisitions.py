"""acquisitions above granules: scenes become granules of an acquisition, unique by granule key

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 10:45:00

An acquisition is platform + datatake start (Landsat: platform + path/row + date); a scene row is one
granule (tile) of it, unique across catalogues and collections (``granule_key`` = acquisition key + tile)
and holding the best-ranked version. Existing rows are re-keyed from their stored item JSON with the same
rules as ``monitor/catalogues/identity.py`` (restated here so this revision never changes meaning); rows
that now turn out to be versions of one granule are merged into the best-ranked one, their observations
and analyses re-pointed to it. ``version_rank`` gains a fourth element (profile preference: 2 for Earth
Search ``sentinel-2-c1-l2a``, 0 for v0 ``sentinel-s2-l2a-cogs``, else 1).
"""
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DATATAKE_ID_RE = re.compile(r"^GS2[A-D]_(\d{8}T\d{6})_")
_PRODUCT_RE = re.compile(r"^S2[A-D]_MSI(?:L2A|L1C)_(\d{8}T\d{6})_")
_PRODUCT_KEYS = ("s2:product_uri", "sentinel:product_id", "sentinel2:product_title")
_PREFERENCE = {"sentinel-2-c1-l2a": 2.0, "sentinel-s2-l2a-cogs": 0.0}


def _datatake(props: dict, item_id: str, acquired_at: datetime) -> datetime:
    value = props.get("s2:datatake_id")
    match = _DATATAKE_ID_RE.match(value) if isinstance(value, str) else None
    if match is None:
        for text in (*(props.get(k) for k in _PRODUCT_KEYS), item_id):
            match = _PRODUCT_RE.match(text) if isinstance(text, str) else None
            if match:
                break
    if match is None:
        return acquired_at.astimezone(UTC).replace(microsecond=0)
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)


def _keys(row) -> tuple[str, str, datetime]:
    props = (row.item or {}).get("properties") or {}
    platform = row.platform or "unknown"
    acquired = row.acquired_at.astimezone(UTC)
    if platform.startswith("landsat"):
        key = f"{platform}|{row.tile or ''}|{acquired:%Y-%m-%d}"
        sensed = acquired
    else:
        sensed = _datatake(props, row.item_id, acquired)
        key = f"{platform}|{sensed:%Y-%m-%dT%H:%M:%SZ}"
    return key, f"{key}|{row.tile or 'id:' + row.item_id}", sensed


def upgrade() -> None:
    op.create_table(
        'acquisitions',
        sa.Column('id', sa.BigInteger(), nullable=False),
        sa.Column('key', sa.Text(), nullable=False),
        sa.Column('platform', sa.Text(), nullable=True),
        sa.Column('sensed_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('relative_orbit', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('key'),
    )
    op.add_column('scenes', sa.Column('acquisition_id', sa.BigInteger(), nullable=True))
    op.add_column('scenes', sa.Column('granule_key', sa.Text(), nullable=True))
    op.add_column('scenes', sa.Column('profile', sa.Text(), nullable=True))
    # The old key was unique per catalogue and tile; the new one is shared by every tile of a datatake.
    op.drop_constraint('uq_scenes_acquisition', 'scenes', type_='unique')

    conn = op.get_bind()
    rows = conn.execute(sa.text(
        "SELECT id, item_id, item, platform, tile, acquired_at, version_rank, collection, relative_orbit "
        "FROM scenes ORDER BY id")).all()
    by_granule: dict[str, list[tuple[list, int]]] = {}
    for row in rows:
        key, granule, sensed = _keys(row)
        acquisition_id = conn.execute(sa.text(
            "INSERT INTO acquisitions (key, platform, sensed_at, relative_orbit) VALUES (:k, :p, :s, :o) "
            "ON CONFLICT (key) DO UPDATE SET key = EXCLUDED.key RETURNING id"),
            {"k": key, "p": row.platform, "s": sensed, "o": row.relative_orbit}).scalar_one()
        rank = list(row.version_rank or [])[:3]
        rank += [0.0] * (3 - len(rank)) + [_PREFERENCE.get(row.collection, 1.0)]
        conn.execute(sa.text(
            "UPDATE scenes SET acquisition_id = :a, acquisition_key = :k, granule_key = :g, "
            "version_rank = CAST(:r AS jsonb) WHERE id = :id"),
            {"a": acquisition_id, "k": key, "g": granule, "r": json.dumps(rank), "id": row.id})
        by_granule.setdefault(granule, []).append((rank, row.id))

    for versions in by_granule.values():
        if len(versions) < 2:
            continue
        versions.sort(key=lambda v: (v[0], v[1]), reverse=True)
        winner = versions[0][1]
        for _, loser in versions[1:]:
            params = {"w": winner, "l": loser}
            conn.execute(sa.text("UPDATE analyses SET after_scene_id = :w WHERE after_scene_id = :l"), params)
            conn.execute(sa.text("UPDATE analyses SET before_scene_id = :w WHERE before_scene_id = :l"), params)
            conn.execute(sa.text(
                "DELETE FROM observations WHERE scene_id = :l AND area_id IN "
                "(SELECT area_id FROM observations WHERE scene_id = :w)"), params)
            conn.execute(sa.text("UPDATE observations SET scene_id = :w WHERE scene_id = :l"), params)
            conn.execute(sa.text("DELETE FROM scenes WHERE id = :l"), params)

    op.alter_column('scenes', 'acquisition_id', nullable=False)
    op.alter_column('scenes', 'granule_key', nullable=False)
    op.create_foreign_key('scenes_acquisition_id_fkey', 'scenes', 'acquisitions', ['acquisition_id'], ['id'],
                          ondelete='RESTRICT')
    op.create_unique_constraint('uq_scenes_granule', 'scenes', ['granule_key'])
    op.create_index('ix_scenes_acquisition', 'scenes', ['acquisition_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_scenes_acquisition', table_name='scenes')
    op.drop_constraint('uq_scenes_granule', 'scenes', type_='unique')
    # Back to the old per-catalogue key platform|tile|sensing second (unique per tile and time).
    op.execute("""
        UPDATE scenes SET acquisition_key = coalesce(platform, 'unknown') || '|' || coalesce(tile, '') || '|'
               || to_char(acquired_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
               version_rank = jsonb_path_query_array(version_rank, '$[0 to 2]')
    """)
    op.create_unique_constraint('uq_scenes_acquisition', 'scenes', ['catalogue_id', 'acquisition_key'])
    op.drop_constraint('scenes_acquisition_id_fkey', 'scenes', type_='foreignkey')
    op.drop_column('scenes', 'profile')
    op.drop_column('scenes', 'granule_key')
    op.drop_column('scenes', 'acquisition_id')
    op.drop_table('acquisitions')
