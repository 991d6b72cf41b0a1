"""The history store, run against SQLite and a real PostgreSQL server alike."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from defectlens.history.schema import metadata
from defectlens.history.store import HistoryQuery, HistoryStore


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'history.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = HistoryStore(url).upgrade()
    yield s
    s.close()


def row(request_id: str, model: str = "bottle", verdict: str = "good", score: float = 0.5, **extra) -> dict:
    return {"request_id": request_id, "model": model, "model_checksum": "c" * 64, "source": f"{request_id}.png", "image_sha256": "f" * 64,
            "width": 64, "height": 48, "score": score, "normalised_score": 0.4, "threshold": 1.0, "verdict": verdict, "severity": 0.0,
            "regions": [{"box": [1, 2, 3, 4], "severity": 0.5}], "timings_ms": {"backbone": 3.5}, **extra}


def test_migrations_build_exactly_the_declared_schema(store):
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    assert store.revision() == "0002"
    store.upgrade()  # a second start on the same database changes nothing
    assert store.revision() == "0002" and store.count() == 0


def test_a_request_id_is_stored_once_even_from_concurrent_writers(store):
    outcomes: list[bool] = []
    lock = threading.Lock()

    def writer(t: int) -> None:
        for i in range(25):
            _, created = store.record(row(f"w{t}-{i}"))
            _, again = store.record(row(f"w{t}-{i % 5}"))  # retries of earlier requests
            with lock:
                outcomes.extend([created, again])

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count() == 200 and outcomes.count(True) == 200
    stored, created = store.record(row("w3-7", score=9.0))
    assert not created and stored["score"] == 0.5 and stored["regions"] == [{"box": [1, 2, 3, 4], "severity": 0.5}]


def test_queries_filter_page_and_summarise(store):
    start = datetime(2026, 11, 20, 8, 30, tzinfo=timezone.utc)
    for i in range(12):
        model = "bottle" if i < 8 else "tile"
        store.record(row(f"r{i:02d}", model, "defect" if i % 4 == 0 else "good", score=float(i), created_at=start + timedelta(hours=i)))
    total, items = store.query(HistoryQuery(model="bottle"), limit=3, offset=0)
    assert total == 8 and [r["request_id"] for r in items] == ["r07", "r06", "r05"]
    assert items[0]["created_at"] == (start + timedelta(hours=7)).isoformat()
    assert store.query(HistoryQuery(verdict="defect"))[0] == 3
    assert store.query(HistoryQuery(since=start + timedelta(hours=2), until=start + timedelta(hours=5)))[0] == 3
    assert store.query(HistoryQuery(request_prefix="r1"))[0] == 2
    assert store.query(HistoryQuery(request_prefix="r_"))[0] == 0  # a prefix is literal, not a LIKE pattern
    stats = store.stats(HistoryQuery(), "hour")
    assert {m["model"]: (m["total"], m["defects"]) for m in stats["models"]} == {"bottle": (8, 2), "tile": (4, 1)}
    assert stats["series"][0] == {"model": "bottle", "bucket": "2026-11-20T08:00", "total": 1, "defects": 1, "defect_rate": 1.0}
    days = store.stats(HistoryQuery(model="bottle"), "day")["series"]
    assert days == [{"model": "bottle", "bucket": "2026-11-20", "total": 8, "defects": 2, "defect_rate": 0.25}]


def test_threshold_history_belongs_to_one_model_file(store):
    store.record_threshold_change("bottle", "a" * 64, "set", 1.0, 1.2, "lot 7", "key:1")
    store.record_threshold_change("bottle", "b" * 64, "set", 2.0, 2.5, "new model", "key:1")
    store.record_threshold_change("bottle", "a" * 64, "undo", 1.2, 1.0, "undo", "key:2")
    assert [c["new_threshold"] for c in store.threshold_history("bottle", "a" * 64)] == [1.2, 1.0]
    assert [c["reason"] for c in store.threshold_history("bottle", "b" * 64)] == ["new model"]
    assert store.threshold_history("tile", "a" * 64) == []


def test_feedback_and_model_versions_are_stored_with_their_audit_entries_or_not_at_all(store, monkeypatch):
    """A database lost between the feedback row and its audit entry must leave neither: both go
    in one transaction, as a model version and its 'model.learn' or 'model.rollback' entry do."""
    import sqlalchemy as sa

    from defectlens.history import store as store_module
    from defectlens.history.store import StoreError

    inspection = store.record(row("r1"))[0]["id"]

    def lost(*args, **kwargs):
        raise sa.exc.OperationalError("INSERT INTO audit_log", {}, ConnectionError("server closed the connection"))

    monkeypatch.setattr(store_module, "audit_row", lost)
    with pytest.raises(StoreError):
        store.record_feedback(inspection, "bottle", "good", "", "operator:ab12", "queued", role="operator")
    assert store.feedback() == [] and store.audit_entries()[0] == 0
    monkeypatch.undo()
    fb = store.record_feedback(inspection, "bottle", "good", "", "operator:ab12", "queued", role="operator")
    (entry,) = store.audit_entries()[1]
    assert (entry["action"], entry["details"]["feedback_id"]) == ("feedback", fb["id"])
    learned = store_module.audit_row("operator:ab12", "operator", "model.learn", "bottle", {"feedback_ids": [fb["id"]]})
    version = ("bottle", "learn", 1, "bottle.v1.dlens", "d" * 64, "c" * 64, "c" * 64, [fb["id"]], {}, "operator:ab12")
    with pytest.raises(StoreError):  # the audit entry fails inside the transaction: the version is rolled back
        store.record_version(*version, audit={**learned, "no_such_column": 1})
    assert store.versions("bottle", "c" * 64) == [] and store.audit_entries()[0] == 1
    store.record_version(*version, audit=learned)
    assert len(store.versions("bottle", "c" * 64)) == 1 and store.audit_entries()[1][0]["action"] == "model.learn"
