"""Dashboard sign-outs: sessions ended before their cookie expires.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dashboard_signouts",
        sa.Column("nonce", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_dashboard_signouts_expires_at", "dashboard_signouts", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_dashboard_signouts_expires_at", table_name="dashboard_signouts")
    op.drop_table("dashboard_signouts")
