"""Alembic environment: the service passes its open connection; the alembic CLI gives a URL."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from defectlens.history.schema import metadata

config = context.config
connection = config.attributes.get("connection")


def _run(conn: sa.Connection) -> None:
    # batch mode, so later revisions that alter columns also work on SQLite
    context.configure(connection=conn, target_metadata=metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run(connection)
else:
    with sa.create_engine(config.get_main_option("sqlalchemy.url")).connect() as conn:
        _run(conn)
