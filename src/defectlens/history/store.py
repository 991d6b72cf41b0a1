"""The inspection history: every inspection and threshold change, in SQLite or PostgreSQL.

A row is committed before the client hears the verdict, so whatever a client was told is on
disk even if the server is killed the next instant. Request ids are unique: a client that
retries after a lost answer gets the stored row back rather than a second one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.exc import DisconnectionError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError

from defectlens.errors import DefectLensError
from defectlens.history.schema import audit_log, feedback, inspections, model_versions, threshold_changes
from defectlens.inference.inspection import Inspection
from defectlens.inference.record import FIELDS, flat

MIGRATIONS = Path(__file__).parent / "migrations"
BUCKETS = ("hour", "day")


class StoreError(DefectLensError):
    """The history database cannot be reached or used."""


class StoreUnavailable(StoreError):
    """The database server is away (down, restarting, unreachable): worth journaling and retrying."""


UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError)


@contextlib.contextmanager
def _available(url: str, writing: bool = False):
    """A server that is away becomes StoreUnavailable (worth journaling and retrying); with
    ``writing``, any other failure but a duplicate key (which callers resolve) a StoreError naming
    the database, never a raw driver traceback."""
    try:
        yield
    except UNAVAILABLE as exc:
        raise StoreUnavailable(f"{masked_url(url)}: history database unavailable ({_reason(exc)})") from None
    except IntegrityError:
        raise
    except SQLAlchemyError as exc:
        if not writing:
            raise
        raise StoreError(f"{masked_url(url)}: cannot write to the history ({_reason(exc)})") from None


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def audit_row(actor: str, role: str, action: str, model: str | None, details: dict[str, Any] | None,
               created_at: datetime | None = None) -> dict[str, Any]:
    return {"created_at": created_at or utcnow(), "actor": actor, "role": role, "action": action[:32], "model": model,
            "details": details or {}}


def as_utc(value: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; every stored time is UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def masked_url(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


@dataclass
class HistoryQuery:
    model: str | None = None
    verdict: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    request_prefix: str | None = None  # one client's run, e.g. a load test's


# Record fields the history does not keep: the model is the row's own column, and confidence
# follows from score, threshold and the model's spread
NOT_STORED = ("confidence", "model")


def inspection_row(inspection: Inspection, model: str, checksum: str, image_sha256: str, request_id: str, image_path: str | None = None) -> dict[str, Any]:
    """The history row of one Inspection, the same whether the service or a batch job made it:
    the record's fields (inference.record) and where the row came from."""
    record = flat(inspection.to_record())
    row = {f.name: record[f.name] for f in FIELDS if f.name not in NOT_STORED}
    row["source"] = row["source"][:512]
    return {"request_id": request_id, "model": model, "model_checksum": checksum, "image_sha256": image_sha256, "image_path": image_path, **row}


class HistoryStore:
    """Reads and writes the history through one SQLAlchemy engine (thread-safe pool)."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            parsed = sa.make_url(url)
        except (sa.exc.ArgumentError, ValueError):
            raise StoreError(f"{url}: not a database URL (e.g. sqlite:///history.db or postgresql+psycopg://user@host/db)") from None
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:":
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        try:
            self.engine = sa.create_engine(parsed, **kwargs)
        except (SQLAlchemyError, ImportError) as exc:
            raise StoreError(f"{masked_url(url)}: cannot open the history database ({type(exc).__name__}: {exc})".splitlines()[0]) from None
        if self.dialect == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._write_lock = threading.Lock() if self.dialect == "sqlite" else None

    # -- schema -----------------------------------------------------------------------------
    def upgrade(self) -> HistoryStore:
        """Bring the schema to the newest Alembic revision (creates it on an empty database)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        try:
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except SQLAlchemyError as exc:
            raise StoreError(f"{masked_url(self.url)}: cannot prepare the history database ({_reason(exc)})") from None
        return self

    def revision(self) -> str | None:
        with self.engine.connect() as conn:
            from alembic.runtime.migration import MigrationContext

            return MigrationContext.configure(conn).get_current_revision()

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except SQLAlchemyError:
            return False

    def close(self) -> None:
        self.engine.dispose()

    # -- inspections ------------------------------------------------------------------------
    def record(self, row: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Insert one inspection; returns (stored row, True), or (the earlier row, False) on a retry."""
        row = {**row, "created_at": row.get("created_at") or utcnow()}
        try:
            with _available(self.url, writing=True), self._writing(), self.engine.begin() as conn:
                new_id = conn.execute(inspections.insert().values(**row)).inserted_primary_key[0]
            return _row({**dict.fromkeys(inspections.c.keys()), **row, "id": new_id}), True
        except IntegrityError as exc:
            existing = self.by_request_id(row["request_id"])
            if existing is None:
                raise StoreError(f"{masked_url(self.url)}: row refused ({_reason(exc)})") from None
            return existing, False

    def by_request_id(self, request_id: str) -> dict[str, Any] | None:
        with _available(self.url), self.engine.connect() as conn:
            found = conn.execute(inspections.select().where(inspections.c.request_id == request_id)).mappings().first()
        return None if found is None else _row(found)

    def get(self, inspection_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            found = conn.execute(inspections.select().where(inspections.c.id == inspection_id)).mappings().first()
        return None if found is None else _row(found)

    def query(self, q: HistoryQuery, limit: int = 50, offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """Newest first; ``total`` counts every match so a client can page."""
        where = self._where(q)
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(inspections).where(*where)).scalar_one()
            rows = conn.execute(inspections.select().where(*where).order_by(inspections.c.id.desc()).limit(limit).offset(offset)).mappings()
            return int(total), [_row(r) for r in rows]

    def stats(self, q: HistoryQuery, bucket: str = "hour") -> dict[str, Any]:
        """Counts and defect rate per model, and per model and time bucket (for the trend chart)."""
        if bucket not in BUCKETS:
            raise DefectLensError(f"bucket must be one of {', '.join(BUCKETS)}, got {bucket!r}")
        where = self._where(q)
        defects = sa.func.sum(sa.case((inspections.c.verdict == "defect", 1), else_=0))
        period = self._bucket(bucket).label("bucket")
        with self.engine.connect() as conn:
            per_model = conn.execute(sa.select(inspections.c.model, sa.func.count(), defects, sa.func.avg(inspections.c.score))
                                     .where(*where).group_by(inspections.c.model).order_by(inspections.c.model)).all()
            series = conn.execute(sa.select(inspections.c.model, period, sa.func.count(), defects)
                                  .where(*where).group_by(inspections.c.model, period).order_by(period, inspections.c.model)).all()
        return {
            "bucket": bucket,
            "models": [{"model": m, "total": n, "defects": int(d or 0), "defect_rate": (d or 0) / n, "mean_score": s} for m, n, d, s in per_model],
            "series": [{"model": m, "bucket": str(b), "total": n, "defects": int(d or 0), "defect_rate": (d or 0) / n} for m, b, n, d in series],
        }

    def recent_scores(self, model: str, checksum: str | None, limit: int, with_rows: bool = False) -> list[Any]:
        """The newest ``limit`` decision scores of a model (of one model file, with ``checksum``), newest first."""
        c = inspections.c
        where = [c.model == model] + ([c.model_checksum == checksum] if checksum else [])
        cols = [c.id, c.created_at, c.score, c.verdict] if with_rows else [c.score]
        with _available(self.url), self.engine.connect() as conn:
            rows = conn.execute(sa.select(*cols).where(*where).order_by(c.id.desc()).limit(limit)).mappings().all()
        return [_row(r) for r in rows] if with_rows else [float(r["score"]) for r in rows]

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(inspections)).scalar_one())

    # -- thresholds -------------------------------------------------------------------------
    def record_threshold_change(self, model: str, checksum: str, action: str, old: float, new: float, reason: str, actor: str,
                                role: str | None = None) -> dict[str, Any]:
        """The change, and with ``role`` its audit-log entry, in one transaction: either both are
        stored or neither (a database that goes away between them cannot leave a change unaudited)."""
        now = utcnow()
        row = {"created_at": now, "model": model, "model_checksum": checksum, "action": action,
               "old_threshold": old, "new_threshold": new, "reason": reason[:512], "actor": actor}
        also = [] if role is None else [(audit_log, audit_row(actor, role, f"threshold.{action}", model,
                                                              {"old": old, "new": new, "reason": reason[:512]}, now))]
        return self._insert(threshold_changes, row, *also)

    def threshold_history(self, model: str, checksum: str) -> list[dict[str, Any]]:
        """Changes to this exact model file, oldest first (a new file starts from its calibration)."""
        t = threshold_changes
        with self.engine.connect() as conn:
            rows = conn.execute(t.select().where(t.c.model == model, t.c.model_checksum == checksum).order_by(t.c.id)).mappings()
            return [_row(r) for r in rows]

    # -- feedback, model versions, audit --------------------------------------------------------
    def record_feedback(self, inspection_id: int, model: str, label: str, note: str, actor: str, status: str,
                        reason: str | None = None, model_checksum: str | None = None, defect_type: str | None = None,
                        role: str | None = None) -> dict[str, Any]:
        """The feedback, and with ``role`` its audit-log entry, in one transaction (as a threshold change)."""
        now = utcnow()
        row = {"created_at": now, "inspection_id": inspection_id, "model": model, "label": label, "defect_type": defect_type, "note": note[:512],
               "actor": actor, "status": status, "reason": None if reason is None else reason[:512], "model_checksum": model_checksum}
        also = [] if role is None else [(audit_log, lambda new_id: audit_row(
            actor, role, "feedback", model, {"inspection_id": inspection_id, "label": label, "feedback_id": new_id}, now))]
        return self._insert(feedback, row, *also)

    def update_feedback(self, feedback_id: int, status: str, reason: str | None = None, model_checksum: str | None = None) -> None:
        """Only what became of the feedback changes (learned, queued); who said what never does."""
        with _available(self.url, writing=True), self._writing(), self.engine.begin() as conn:
            conn.execute(feedback.update().where(feedback.c.id == feedback_id)
                         .values(status=status, reason=None if reason is None else reason[:512], model_checksum=model_checksum))

    def feedback(self, model: str | None = None, inspection_id: int | None = None, label: str | None = None, status: str | None = None,
                 limit: int = 500) -> list[dict[str, Any]]:
        """Newest first."""
        c = feedback.c
        where = [cond for cond, given in ((c.model == model, model), (c.inspection_id == inspection_id, inspection_id),
                                          (c.label == label, label), (c.status == status, status)) if given is not None]
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(feedback.select().where(*where).order_by(c.id.desc()).limit(limit)).mappings()]

    def confirmed(self, model: str, label: str) -> list[dict[str, Any]]:
        """Inspections whose latest feedback says ``label``, with that feedback's defect type: what
        operators confirmed, an operator's later word overriding an earlier one."""
        latest = sa.select(feedback.c.inspection_id, sa.func.max(feedback.c.id).label("last")).where(feedback.c.model == model)\
            .group_by(feedback.c.inspection_id).subquery()
        query = (sa.select(inspections, feedback.c.defect_type, feedback.c.id.label("feedback_id"))
                 .join(latest, latest.c.inspection_id == inspections.c.id)
                 .join(feedback, feedback.c.id == latest.c.last)
                 .where(feedback.c.label == label).order_by(inspections.c.id))
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(query).mappings()]

    def record_version(self, model: str, action: str, version: int, file: str, checksum: str, parent_checksum: str | None,
                       root_checksum: str, feedback_ids: list[int], details: dict[str, Any], actor: str,
                       audit: dict[str, Any] | None = None) -> dict[str, Any]:
        """The switch, and ``audit`` (an audit-log row) in the same transaction."""
        row = {"created_at": utcnow(), "model": model, "action": action, "version": version, "file": file, "checksum": checksum,
               "parent_checksum": parent_checksum, "root_checksum": root_checksum, "feedback_ids": list(feedback_ids),
               "details": details, "actor": actor}
        return self._insert(model_versions, row, *([] if audit is None else [(audit_log, audit)]))

    def versions(self, model: str, root_checksum: str) -> list[dict[str, Any]]:
        """Every switch of this model name away from (and back towards) the root file, oldest first."""
        t = model_versions
        with self.engine.connect() as conn:
            rows = conn.execute(t.select().where(t.c.model == model, t.c.root_checksum == root_checksum).order_by(t.c.id)).mappings()
            return [_row(r) for r in rows]

    def audit(self, actor: str, role: str, action: str, model: str | None = None, details: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._insert(audit_log, audit_row(actor, role, action, model, details))

    def audit_entries(self, limit: int = 100, offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """Newest first."""
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one()
            rows = conn.execute(audit_log.select().order_by(audit_log.c.id.desc()).limit(limit).offset(offset)).mappings()
            return int(total), [_row(r) for r in rows]

    # -- helpers ----------------------------------------------------------------------------
    def _insert(self, table: sa.Table, row: dict[str, Any],
                *also: tuple[sa.Table, dict[str, Any] | Callable[[int], dict[str, Any]]]) -> dict[str, Any]:
        """Insert ``row`` (and the ``also`` rows, in the same transaction; a callable one is made
        from the first row's new id); the first row back with its id."""
        try:
            with _available(self.url, writing=True), self._writing(), self.engine.begin() as conn:
                row = {**row, "id": conn.execute(table.insert().values(**row)).inserted_primary_key[0]}
                for other, values in also:
                    conn.execute(other.insert().values(**(values(row["id"]) if callable(values) else values)))
        except IntegrityError as exc:
            raise StoreError(f"{masked_url(self.url)}: row refused ({_reason(exc)})") from None
        return _row(row)

    def _writing(self):
        """SQLite allows one writer: queue writers here rather than spin on 'database is locked'."""
        return self._write_lock or contextlib.nullcontext()

    def _where(self, q: HistoryQuery) -> list:
        c = inspections.c
        where = []
        if q.model:
            where.append(c.model == q.model)
        if q.verdict:
            where.append(c.verdict == q.verdict)
        if q.since:
            where.append(c.created_at >= q.since)
        if q.until:
            where.append(c.created_at < q.until)
        if q.request_prefix:
            where.append(c.request_id.startswith(q.request_prefix, autoescape=True))
        return where

    def _bucket(self, unit: str):
        col = inspections.c.created_at
        if self.dialect == "postgresql":
            return sa.func.to_char(sa.func.date_trunc(unit, sa.func.timezone("UTC", col)), 'YYYY-MM-DD"T"HH24:00' if unit == "hour" else "YYYY-MM-DD")
        return sa.func.strftime("%Y-%m-%dT%H:00" if unit == "hour" else "%Y-%m-%d", col)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the dashboard read while the line writes; synchronous=FULL makes every commit
    # durable before the verdict goes out (a killed process never loses a confirmed row).
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _row(mapping: Any) -> dict[str, Any]:
    row = dict(mapping)
    if isinstance(row.get("created_at"), datetime):
        row["created_at"] = as_utc(row["created_at"]).isoformat()
    return row


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(getattr(exc, "orig", exc)).strip() else type(exc).__name__
