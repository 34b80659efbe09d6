"""warm pool: the pool a launch fills (pooled servers are launches with status ``pooled``)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("launches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pool_key", sa.String(length=640), nullable=True))
        batch_op.create_index("ix_launches_pool_key", ["pool_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("launches", schema=None) as batch_op:
        batch_op.drop_index("ix_launches_pool_key")
        batch_op.drop_column("pool_key")
