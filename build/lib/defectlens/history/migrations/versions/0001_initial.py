"""Inspections and threshold changes.

Written out column by column rather than built from schema.py on purpose: a revision is a frozen
record of what it created, so later edits to schema.py (with their own revisions) never change
what upgrading an old database through this one does.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("model_checksum", sa.String(64), nullable=False),
        sa.Column("source", sa.String(512), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_path", sa.String(1024), nullable=True),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("normalised_score", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("severity", sa.Float(), nullable=False),
        sa.Column("regions", sa.JSON(), nullable=False),
        sa.Column("timings_ms", sa.JSON(), nullable=False),
    )
    op.create_index("ix_inspections_model_created", "inspections", ["model", "created_at"])
    op.create_index("ix_inspections_created", "inspections", ["created_at"])
    op.create_index("ix_inspections_verdict", "inspections", ["verdict"])
    op.create_index("ix_inspections_image_sha256", "inspections", ["image_sha256"])
    op.create_table(
        "threshold_changes",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("model_checksum", sa.String(64), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("old_threshold", sa.Float(), nullable=False),
        sa.Column("new_threshold", sa.Float(), nullable=False),
        sa.Column("reason", sa.String(512), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
    )
    op.create_index("ix_threshold_changes_model", "threshold_changes", ["model", "model_checksum", "id"])


def downgrade() -> None:
    op.drop_table("threshold_changes")
    op.drop_table("inspections")
