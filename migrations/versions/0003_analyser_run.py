"""analyses.analyser_run: what the worker actually ran (checkpoint included)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:30:00

``analyses.analyser`` becomes the *request* (``spectral@1`` or ``unirs+spectral@1``, decided by the
scheduler); the worker records in ``analyser_run`` what it ran with the checkpoint it had loaded
(``unirs@<checkpoint>+spectral@1``, or ``spectral@1`` when it had no weights). Existing rows: a finished
analysis keeps its old label as what ran, and its request loses the checkpoint name.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("analyses", sa.Column("analyser_run", sa.Text(), nullable=True))
    op.execute("UPDATE analyses SET analyser_run = analyser WHERE status IN ('done', 'skipped', 'failed')")
    op.execute("UPDATE analyses SET analyser = regexp_replace(analyser, '^unirs@[^+]*\\+', 'unirs+') "
               "WHERE analyser LIKE 'unirs@%'")


def downgrade() -> None:
    op.execute("UPDATE analyses SET analyser = analyser_run "
               "WHERE analyser_run IS NOT NULL AND analyser_run LIKE 'unirs@%'")
    op.drop_column("analyses", "analyser_run")
