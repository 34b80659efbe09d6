"""launch claims: which task run holds a starting launch, until when; failed spawns

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 12:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("launches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=32), nullable=True))
        batch_op.add_column(
            sa.Column("claim_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("spawn_failures", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("launches", schema=None) as batch_op:
        batch_op.drop_column("spawn_failures")
        batch_op.drop_column("claim_expires_at")
        batch_op.drop_column("claimed_by")
