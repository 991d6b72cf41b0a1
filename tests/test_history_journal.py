"""History through a database outage: rows journaled in order, written once when it returns."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy as sa

from defectlens.history.journal import JournaledStore
from defectlens.history.schema import inspections
from defectlens.history.store import HistoryStore, StoreUnavailable

from .servers import Server


class Flaky(HistoryStore):
    """A real SQLite store whose server 'goes away' while ``down`` is set."""

    down = False

    def record(self, row):
        if self.down:
            raise StoreUnavailable("history database unavailable (connection refused)")
        return super().record(row)


def row(i: int) -> dict:
    return {"request_id": f"req-{i:03d}", "model": "discs", "model_checksum": "c" * 64, "source": f"part{i}.png", "image_sha256": "0" * 64,
            "image_path": None, "width": 64, "height": 64, "score": float(i), "normalised_score": 0.5, "threshold": 1.0,
            "verdict": "good", "severity": 0.0, "regions": [], "timings_ms": {}}


def stored(store: HistoryStore) -> list[str]:
    with store.engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.select(inspections.c.request_id).order_by(inspections.c.id))]


def test_rows_wait_in_order_and_are_written_once_when_the_database_returns(tmp_path):
    db = Flaky(f"sqlite:///{tmp_path / 'h.db'}").upgrade()
    journal = JournaledStore(db, tmp_path / "journal")
    journal.record(row(0))
    db.down = True
    for i in range(1, 6):
        answer, created = journal.record(row(i))
        assert created and answer["id"] is None and answer["journaled"]
    assert journal.degraded and journal.waiting == 5 and journal.state()["state"] == "degraded"
    assert journal.record(row(3))[1] is False  # a retried request while away: still one row
    assert journal.by_request_id("req-004")["score"] == 4.0
    db.down = False
    journal.record(row(6))  # the database is back, but older rows wait: this one queues behind them
    assert stored(db) == ["req-000"]
    assert journal.drain() == 0 and not journal.degraded
    assert stored(db) == [f"req-{i:03d}" for i in range(7)]
    assert journal.drain() == 0 and stored(db) == [f"req-{i:03d}" for i in range(7)]
    journal.close()


def test_a_journal_left_by_a_killed_process_is_adopted(tmp_path):
    db = Flaky(f"sqlite:///{tmp_path / 'h.db'}").upgrade()
    db.down = True
    first = JournaledStore(db, tmp_path / "journal")
    for i in range(3):
        first.record(row(i))
    first._stop.set()
    first._fh.close()
    left = first.path.rename(first.path.with_name("pending-999999.1-dead.jsonl"))  # its process is gone
    with open(left, "ab") as fh:
        fh.write(b'{"request_id": "half')  # the kill cut the last line: never answered, never written
    db.down = False
    second = JournaledStore(db, tmp_path / "journal")
    assert second.waiting == 3 and not left.exists()
    assert second.drain() == 0 and stored(db) == ["req-000", "req-001", "req-002"]
    second.close()
    assert not list((tmp_path / "journal").iterdir())


@pytest.mark.slow
def test_postgres_stopped_and_restarted_during_a_load_every_answer_has_one_row(model_dir, tmp_path, tiny_dataset, postgres_cluster):
    db = postgres_cluster.new_database()
    server = Server(model_dir / "discs.dlens", db, tmp_path / "server.log", ("--api-key", "k"))
    images = [p.read_bytes() for p in sorted((tiny_dataset / "test").rglob("*.png"))]
    answered: dict[str, int] = {}
    lock = threading.Lock()
    degraded_seen = threading.Event()
    failed: list[str] = []

    def wait_for(count: int) -> None:
        deadline = time.time() + 120
        while len(answered) < count and not failed and time.time() < deadline:
            time.sleep(0.02)
        assert not failed and len(answered) >= count, failed[:3]

    def send(i: int) -> None:
        key = f"outage-{i:04d}"
        for _ in range(5):  # a client retries on a dropped connection, with the same key
            try:
                r = httpx.post(f"{server.url}/api/models/discs/inspect", content=images[i % len(images)], headers={"Idempotency-Key": key},
                               timeout=30)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            if r.status_code == 200:
                with lock:
                    answered[key] = r.status_code
                if r.json().get("journaled"):
                    degraded_seen.set()
                return
            failed.append(f"{key}: HTTP {r.status_code} {r.text[:200]}")
            return

    n = 160
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, i) for i in range(n)]
            wait_for(40)
            postgres_cluster.stop()  # mid-shift: the database server goes away
            wait_for(100)
            status = httpx.get(f"{server.url}/api/status", timeout=10).json()
            ready = httpx.get(f"{server.url}/ready", timeout=10).json()
            postgres_cluster.start()  # and comes back
            for f in futures:
                f.result()
        assert status["history"]["state"] == "degraded" and status["history"]["journaled"] > 0
        assert ready["ready"] and ready["degraded"]
        assert degraded_seen.is_set()
        deadline = time.time() + 60
        while httpx.get(f"{server.url}/ready", timeout=10).json()["degraded"] and time.time() < deadline:
            time.sleep(0.5)
        assert not httpx.get(f"{server.url}/ready", timeout=10).json()["degraded"]
    finally:
        server.stop()
    store = HistoryStore(db)
    ids = [r for r in stored(store) if r.startswith("outage-")]
    store.close()
    assert len(answered) == n and len(ids) == n and set(ids) == set(answered)  # every answer, exactly one row
    assert not [p for p in (model_dir / ".history-journal").rglob("pending-*") if p.stat().st_size]  # nothing left waiting
