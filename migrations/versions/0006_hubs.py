"""several Hubs: the Hub each launch is placed on, and each Hub's last health check

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 18:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("launches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hub", sa.String(length=63), nullable=True))
        batch_op.create_index("ix_launches_hub", ["hub"], unique=False)
    op.create_table(
        "hub_health",
        sa.Column("name", sa.String(length=63), primary_key=True),
        sa.Column("healthy", sa.Boolean(), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("hub_health")
    with op.batch_alter_table("launches", schema=None) as batch_op:
        batch_op.drop_index("ix_launches_hub")
        batch_op.drop_column("hub")
