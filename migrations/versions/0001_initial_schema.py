"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 09:01:41.318596
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from geoalchemy2 import Geometry
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


ENUMS = ("area_status", "alert_frequency", "pairing_policy", "observation_status", "analysis_status",
         "delivery_status")


def upgrade() -> None:
    # PostGIS may be missing on a fresh database; creating it needs a superuser or a trusted extension.
    op.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    op.create_geospatial_table('areas',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('geom', Geometry(geometry_type='MULTIPOLYGON', srid=4326, dimension=2, spatial_index=False, from_text='ST_GeomFromEWKT', name='geometry', nullable=False), nullable=False),
    sa.Column('area_km2', sa.Float(), nullable=False),
    sa.Column('status', sa.Enum('active', 'paused', name='area_status'), nullable=False),
    sa.Column('collections', postgresql.ARRAY(sa.Text()), nullable=False),
    sa.Column('max_cloud_cover', sa.Float(), nullable=False),
    sa.Column('min_clear_fraction', sa.Float(), nullable=False),
    sa.Column('recipients', postgresql.ARRAY(sa.Text()), nullable=False),
    sa.Column('questions', postgresql.ARRAY(sa.Text()), nullable=False),
    sa.Column('alert_frequency', sa.Enum('immediate', 'daily', 'off', name='alert_frequency'), nullable=False),
    sa.Column('min_alert_hectares', sa.Float(), nullable=False),
    sa.Column('pairing_policy', sa.Enum('latest', 'seasonal', name='pairing_policy'), nullable=False),
    sa.Column('properties', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('last_digest_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_geospatial_index('ix_areas_geom', 'areas', ['geom'], unique=False, postgresql_using='gist', postgresql_ops={})
    op.create_table('catalogues',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('digests',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('area_id', sa.Integer(), nullable=False),
    sa.Column('period_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('period_end', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['area_id'], ['areas.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('area_id', 'period_end', name='uq_digests_area_period')
    )
    op.create_table('poll_states',
    sa.Column('catalogue_id', sa.Integer(), nullable=False),
    sa.Column('collection', sa.Text(), nullable=False),
    sa.Column('cursor', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_success_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('items_seen', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['catalogue_id'], ['catalogues.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('catalogue_id', 'collection')
    )
    op.create_table('quarantined_items',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('catalogue_id', sa.Integer(), nullable=False),
    sa.Column('collection', sa.Text(), nullable=True),
    sa.Column('item_id', sa.Text(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('raw', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('seen_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['catalogue_id'], ['catalogues.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('catalogue_id', 'item_id', 'reason', name='uq_quarantine_item_reason', postgresql_nulls_not_distinct=True)
    )
    op.create_geospatial_table('scenes',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('catalogue_id', sa.Integer(), nullable=False),
    sa.Column('collection', sa.Text(), nullable=False),
    sa.Column('acquisition_key', sa.Text(), nullable=False),
    sa.Column('item_id', sa.Text(), nullable=False),
    sa.Column('version_rank', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('platform', sa.Text(), nullable=True),
    sa.Column('tile', sa.Text(), nullable=True),
    sa.Column('relative_orbit', sa.Integer(), nullable=True),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('cloud_cover', sa.Float(), nullable=True),
    sa.Column('processing_baseline', sa.Text(), nullable=True),
    sa.Column('footprint', Geometry(srid=4326, dimension=2, spatial_index=False, from_text='ST_GeomFromEWKT', name='geometry', nullable=False), nullable=False),
    sa.Column('assets', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('item', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('versions_seen', sa.Integer(), nullable=False),
    sa.Column('first_seen_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['catalogue_id'], ['catalogues.id'], ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('catalogue_id', 'acquisition_key', name='uq_scenes_acquisition')
    )
    op.create_index('ix_scenes_acquired_at', 'scenes', ['acquired_at'], unique=False)
    op.create_geospatial_index('ix_scenes_footprint', 'scenes', ['footprint'], unique=False, postgresql_using='gist', postgresql_ops={})
    op.create_index('ix_scenes_tile_acquired', 'scenes', ['tile', 'acquired_at'], unique=False)
    op.create_table('analyses',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('idempotency_key', sa.Text(), nullable=False),
    sa.Column('area_id', sa.Integer(), nullable=False),
    sa.Column('after_scene_id', sa.BigInteger(), nullable=False),
    sa.Column('before_scene_id', sa.BigInteger(), nullable=True),
    sa.Column('analyser', sa.Text(), nullable=False),
    sa.Column('question_set', sa.Text(), nullable=False),
    sa.Column('pairing_policy', sa.Text(), nullable=False),
    sa.Column('pair_reason', sa.Text(), nullable=True),
    sa.Column('status', sa.Enum('pending', 'queued', 'running', 'done', 'skipped', 'failed', name='analysis_status'), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('worker', sa.Text(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('stats', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['after_scene_id'], ['scenes.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['area_id'], ['areas.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['before_scene_id'], ['scenes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idempotency_key')
    )
    op.create_index('ix_analyses_area_created', 'analyses', ['area_id', 'created_at'], unique=False)
    op.create_index('ix_analyses_status_lease', 'analyses', ['status', 'lease_expires_at'], unique=False)
    op.create_table('observations',
    sa.Column('area_id', sa.Integer(), nullable=False),
    sa.Column('scene_id', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'clear', 'cloudy', 'failed', name='observation_status'), nullable=False),
    sa.Column('clear_fraction', sa.Float(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('computed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['area_id'], ['areas.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['scene_id'], ['scenes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('area_id', 'scene_id')
    )
    op.create_index('ix_observations_status', 'observations', ['status'], unique=False)
    op.create_table('deliveries',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('delivery_key', sa.Text(), nullable=False),
    sa.Column('analysis_id', sa.BigInteger(), nullable=True),
    sa.Column('digest_id', sa.BigInteger(), nullable=True),
    sa.Column('recipient', sa.Text(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'sending', 'sent', 'failed', name='delivery_status'), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.Text(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('permanent_failure', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['analysis_id'], ['analyses.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['digest_id'], ['digests.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('delivery_key', 'recipient', name='uq_deliveries_key_recipient')
    )
    op.create_index('ix_deliveries_status_next', 'deliveries', ['status', 'next_attempt_at'], unique=False)
    op.create_geospatial_table('findings',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('analysis_id', sa.BigInteger(), nullable=False),
    sa.Column('area_id', sa.Integer(), nullable=False),
    sa.Column('ordinal', sa.Integer(), nullable=False),
    sa.Column('kind', sa.Text(), nullable=False),
    sa.Column('change_class', sa.Text(), nullable=True),
    sa.Column('geom', Geometry(srid=4326, dimension=2, spatial_index=False, from_text='ST_GeomFromEWKT', name='geometry'), nullable=True),
    sa.Column('hectares', sa.Float(), nullable=True),
    sa.Column('caption', sa.Text(), nullable=True),
    sa.Column('question', sa.Text(), nullable=True),
    sa.Column('answer', sa.Text(), nullable=True),
    sa.Column('confidence', sa.Float(), nullable=True),
    sa.Column('statistics', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('analyser_name', sa.Text(), nullable=False),
    sa.Column('analyser_version', sa.Text(), nullable=False),
    sa.Column('observed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('before_observed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['analysis_id'], ['analyses.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['area_id'], ['areas.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('analysis_id', 'ordinal', name='uq_findings_analysis_ordinal')
    )
    op.create_index('ix_findings_area_observed', 'findings', ['area_id', 'observed_at'], unique=False)
    op.create_geospatial_index('ix_findings_geom', 'findings', ['geom'], unique=False, postgresql_using='gist', postgresql_ops={})
    op.create_index('ix_findings_kind', 'findings', ['kind'], unique=False)
    op.create_index('ix_findings_observed_at', 'findings', ['observed_at'], unique=False)
    op.create_table('finding_images',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('finding_id', sa.BigInteger(), nullable=False),
    sa.Column('role', sa.Text(), nullable=False),
    sa.Column('mime_type', sa.Text(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['finding_id'], ['findings.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('finding_id', 'role', name='uq_finding_images_role')
    )


def downgrade() -> None:
    op.drop_table('finding_images')
    op.drop_index('ix_findings_observed_at', table_name='findings')
    op.drop_index('ix_findings_kind', table_name='findings')
    op.drop_geospatial_index('ix_findings_geom', table_name='findings', postgresql_using='gist', column_name='geom')
    op.drop_index('ix_findings_area_observed', table_name='findings')
    op.drop_geospatial_table('findings')
    op.drop_index('ix_deliveries_status_next', table_name='deliveries')
    op.drop_table('deliveries')
    op.drop_index('ix_observations_status', table_name='observations')
    op.drop_table('observations')
    op.drop_index('ix_analyses_status_lease', table_name='analyses')
    op.drop_index('ix_analyses_area_created', table_name='analyses')
    op.drop_table('analyses')
    op.drop_index('ix_scenes_tile_acquired', table_name='scenes')
    op.drop_geospatial_index('ix_scenes_footprint', table_name='scenes', postgresql_using='gist', column_name='footprint')
    op.drop_index('ix_scenes_acquired_at', table_name='scenes')
    op.drop_geospatial_table('scenes')
    op.drop_table('quarantined_items')
    op.drop_table('poll_states')
    op.drop_table('digests')
    op.drop_table('catalogues')
    op.drop_geospatial_index('ix_areas_geom', table_name='areas', postgresql_using='gist', column_name='geom')
    op.drop_geospatial_table('areas')
    # Tables are gone; their enum types are not dropped with them.
    for name in ENUMS:
        op.execute(f"DROP TYPE IF EXISTS {name}")
