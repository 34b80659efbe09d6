"""pools sized by demand: the spec and pool indexes carry the time a pass reads them by

A demand-sized pool reads, at every refill pass, the launches of its spec created in the last
window and its servers that became ready in it. With the time as the index's second column
those reads cost what the window holds, not the spec's whole history; the two one-column
indexes they replace served only the first column, so writes pay for no more indexes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 21:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("launches", schema=None) as batch_op:
        batch_op.drop_index("ix_launches_spec_key")
        batch_op.create_index("ix_launches_spec_key_created", ["spec_key", "created_at"])
        batch_op.drop_index("ix_launches_pool_key")
        batch_op.create_index("ix_launches_pool_key_ready", ["pool_key", "ready_at"])


def downgrade() -> None:
    with op.batch_alter_table("launches", schema=None) as batch_op:
        batch_op.drop_index("ix_launches_pool_key_ready")
        batch_op.create_index("ix_launches_pool_key", ["pool_key"], unique=False)
        batch_op.drop_index("ix_launches_spec_key_created")
        batch_op.create_index("ix_launches_spec_key", ["spec_key"], unique=False)
