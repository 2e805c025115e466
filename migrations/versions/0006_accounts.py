"""accounts: users, API tokens, login failures, unsubscribes; every area gets an owner

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 10:30:00

The web app (issue 14) serves several users. Existing areas (created with the operator's CLI) are given
to an ``operator@localhost`` admin account created here; it has no password (no browser login) until
``unirs-monitor users passwd`` sets one, and areas created without an owner keep going to it.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("password_hash", sa.Text(), nullable=True),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("email"),
    )
    op.execute("INSERT INTO users (email, name, is_admin) VALUES ('operator@localhost', 'operator', true)")
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("token_hash", sa.Text(), nullable=False),
        sa.Column("scopes", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("prefix"),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    op.create_table(
        "login_failures",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_login_failures_key_at", "login_failures", ["key", "at"])
    op.create_table(
        "unsubscribes",
        sa.Column("area_id", sa.Integer(), nullable=False),
        sa.Column("recipient", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["area_id"], ["areas.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("area_id", "recipient"),
    )
    op.add_column("areas", sa.Column("owner_id", sa.Integer(), nullable=True))
    op.execute("UPDATE areas SET owner_id = (SELECT id FROM users WHERE email = 'operator@localhost')")
    op.alter_column("areas", "owner_id", nullable=False)
    op.create_foreign_key("areas_owner_id_fkey", "areas", "users", ["owner_id"], ["id"], ondelete="RESTRICT")
    op.create_index("ix_areas_owner_id", "areas", ["owner_id"])


def downgrade() -> None:
    op.drop_index("ix_areas_owner_id", table_name="areas")
    op.drop_constraint("areas_owner_id_fkey", "areas", type_="foreignkey")
    op.drop_column("areas", "owner_id")
    op.drop_table("unsubscribes")
    op.drop_index("ix_login_failures_key_at", table_name="login_failures")
    op.drop_table("login_failures")
    op.drop_index("ix_api_tokens_user_id", table_name="api_tokens")
    op.drop_table("api_tokens")
    op.drop_table("users")
