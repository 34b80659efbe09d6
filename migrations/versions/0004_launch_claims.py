"""launch claims: which task run holds a starting launch, until when; failed spawns; the
spec key the per-spec cap counts by

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
        batch_op.add_column(sa.Column("spec_key", sa.String(length=512), nullable=True))
        batch_op.create_index("ix_launches_spec_key", ["spec_key"], unique=False)
    # Sessions that may still hold a server get their key (ended history needs none).
    launches = sa.table(
        "launches",
        sa.column("id", sa.String),
        sa.column("spec", sa.JSON),
        sa.column("spec_key", sa.String),
        sa.column("user_removed_at", sa.DateTime(timezone=True)),
    )
    bind = op.get_bind()
    live = bind.execute(
        sa.select(launches.c.id, launches.c.spec).where(launches.c.user_removed_at.is_(None))
    ).all()
    for launch_id, spec in live:
        bind.execute(
            launches.update()
            .where(launches.c.id == launch_id)
            .values(spec_key=spec_key(spec or {}))
        )


def spec_key(spec: dict[str, object]) -> str:
    """worker.transitions.spec_key as of this revision (a migration must not change later)."""
    if "image" in spec:
        return "image:" + str(spec["image"]).removesuffix(":latest")
    url = str(spec.get("repo", "")).strip().lower().rstrip("/").removesuffix(".git")
    return ("repo:" + url)[:512]


def downgrade() -> None:
    with op.batch_alter_table("launches", schema=None) as batch_op:
        batch_op.drop_index("ix_launches_spec_key")
        batch_op.drop_column("spec_key")
        batch_op.drop_column("spawn_failures")
        batch_op.drop_column("claim_expires_at")
        batch_op.drop_column("claimed_by")
