"""mail: deliveries can be skipped with a reason (unsubscribed); webhook endpoints share the ledger

Revision ID: 0012
Revises: 0007
Create Date: 2026-12-02 15:30:00

``delivery_status`` gains ``skipped`` (a delivery deliberately not sent; ``skip_reason`` says why, e.g. the
recipient unsubscribed from the area). ``webhook_endpoints`` are per-area HTTPS receivers of signed alert
events; their deliveries are rows of the same ``deliveries`` ledger (``webhook_id`` set).
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TYPE delivery_status ADD VALUE IF NOT EXISTS 'skipped'")
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("area_id", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["area_id"], ["areas.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("area_id", "url", name="uq_webhook_endpoints_area_url"),
    )
    op.create_index("ix_webhook_endpoints_area_id", "webhook_endpoints", ["area_id"])
    op.add_column("deliveries", sa.Column("skip_reason", sa.Text(), nullable=True))
    op.add_column("deliveries", sa.Column("webhook_id", sa.Integer(), nullable=True))
    op.create_foreign_key("deliveries_webhook_id_fkey", "deliveries", "webhook_endpoints", ["webhook_id"], ["id"],
                          ondelete="CASCADE")


def downgrade() -> None:
    op.drop_constraint("deliveries_webhook_id_fkey", "deliveries", type_="foreignkey")
    op.execute("DELETE FROM deliveries WHERE webhook_id IS NOT NULL")
    op.drop_column("deliveries", "webhook_id")
    op.drop_column("deliveries", "skip_reason")
    op.drop_index("ix_webhook_endpoints_area_id", table_name="webhook_endpoints")
    op.drop_table("webhook_endpoints")
    # PostgreSQL cannot drop an enum value: rebuild the type without it (skipped rows count as failed).
    op.execute("ALTER TABLE deliveries ALTER COLUMN status TYPE text")
    op.execute("UPDATE deliveries SET status = 'failed' WHERE status = 'skipped'")
    op.execute("DROP TYPE delivery_status")
    op.execute("CREATE TYPE delivery_status AS ENUM ('pending', 'sending', 'sent', 'failed')")
    op.execute("ALTER TABLE deliveries ALTER COLUMN status TYPE delivery_status USING status::delivery_status")
