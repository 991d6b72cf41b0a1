"""Tables of the inspection history.

SQLAlchemy Core rather than ORM classes: the service writes flat rows and reads them back as
dicts for JSON, and the same definitions serve SQLite and PostgreSQL. Every change here needs
an Alembic revision in ``migrations/versions`` (a test compares the two on both databases).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# 64-bit ids on PostgreSQL (a line inspects millions of parts); SQLite autoincrements INTEGER only.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

inspections = sa.Table(
    "inspections",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    # The client's idempotency key (or one made up by the server): a retried request finds its
    # row instead of adding a second one, which is what "no duplicate" rests on.
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
    sa.Index("ix_inspections_model_created", "model", "created_at"),
    sa.Index("ix_inspections_created", "created_at"),
    sa.Index("ix_inspections_verdict", "verdict"),
    sa.Index("ix_inspections_image_sha256", "image_sha256"),
)

threshold_changes = sa.Table(
    "threshold_changes",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("model_checksum", sa.String(64), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),  # set | undo | reset
    sa.Column("old_threshold", sa.Float(), nullable=False),
    sa.Column("new_threshold", sa.Float(), nullable=False),
    sa.Column("reason", sa.String(512), nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),  # which API key (a fingerprint, never the key)
    sa.Index("ix_threshold_changes_model", "model", "model_checksum", "id"),
)

# An operator's word on one inspection. A row of its own: the verdict the line gave stays as it
# was, and several people may disagree over the same part.
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("inspection_id", Id, sa.ForeignKey("inspections.id"), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("label", sa.String(16), nullable=False),  # good | defect
    sa.Column("defect_type", sa.String(64), nullable=True),  # what kind of defect, when the operator says
    sa.Column("note", sa.String(512), nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
    # learned (into model_checksum), queued (for the next fit: the detector cannot learn, or no
    # image copy was kept), or recorded (a defect: for labelled calibration and typing)
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(512), nullable=True),
    sa.Column("model_checksum", sa.String(64), nullable=True),
    sa.Index("ix_feedback_model", "model", "id"),
    sa.Index("ix_feedback_inspection", "inspection_id"),
)

# Which file a model name runs: one row each time the service switches (learn or rollback). The
# newest row for a name and root model is what a restarted service loads again.
model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),  # learn | rollback
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("file", sa.String(256), nullable=False),
    sa.Column("checksum", sa.String(64), nullable=False),
    sa.Column("parent_checksum", sa.String(64), nullable=True),
    sa.Column("root_checksum", sa.String(64), nullable=False),
    sa.Column("feedback_ids", sa.JSON(), nullable=False),
    sa.Column("details", sa.JSON(), nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
    sa.Index("ix_model_versions_model", "model", "root_checksum", "id"),
)

# Every change anyone made through the service, for the dashboard's audit view.
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("model", sa.String(128), nullable=True),
    sa.Column("details", sa.JSON(), nullable=False),
    sa.Index("ix_audit_log_created", "created_at"),
)
