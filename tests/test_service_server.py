"""The service as a real uvicorn process on loopback: a bounded load test from another process,
and a server killed mid-load that loses no row it confirmed."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from defectlens.history.store import HistoryStore
from defectlens.service.loadtest import check_history, history_rows, run_load

from .servers import Server

pytestmark = pytest.mark.slow  # browsers, servers and processes: not for the fast lane


@pytest.fixture()
def served(model_dir, tmp_path):
    db = tmp_path / "history.db"
    server = Server(model_dir / "discs.dlens", f"sqlite:///{db}", tmp_path / "server.log")
    yield server, db
    server.stop()


def test_load_from_another_process_loses_and_duplicates_nothing(served, tiny_dataset, tmp_path):
    server, db = served
    out = tmp_path / "load.json"
    cmd = [sys.executable, "-m", "defectlens", "loadtest", server.url, "--model", "discs", "--images", str(tiny_dataset / "test"),
           "--requests", "2000", "--concurrency", "8", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert figures["ok"] == 2000 and figures["lost"] == 0 and figures["failures"] == {}
    assert figures["history_check"] == {"rows": 2000, "missing": [], "n_missing": 0, "duplicated": [], "unanswered_rows": 0,
                                        "requests_without_row": 0, "ok": True}
    assert figures["requests_per_s"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert "requests/s" in done.stdout and "p99" in done.stdout
    assert HistoryStore(f"sqlite:///{db}").count() == 2000


def test_killing_the_server_mid_load_loses_no_confirmed_row(served, model_dir, tiny_dataset, tmp_path):
    server, db = served
    images = [p.read_bytes() for p in sorted((tiny_dataset / "test").rglob("*.png"))]
    store = HistoryStore(f"sqlite:///{db}")
    results = {}
    load = threading.Thread(target=lambda: results.update(first=run_load(server.url, "discs", images, 600, 8, run_id="kill", timeout=30)))
    load.start()
    deadline = time.time() + 120
    while store.count() < 100 and time.time() < deadline:
        time.sleep(0.05)
    server.kill()  # SIGKILL: no shutdown handler runs
    load.join(120)
    first = results["first"]
    # rows are committed a moment before their answers leave (a batch's eight at once), so the
    # client may have heard of fewer than the 100 rows the kill waited for
    assert 50 <= first.ok < 600 and first.lost > 0, "the kill should land mid-load"

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows_after_kill = [r for r in _rows(store) if r["request_id"].startswith("kill-")]
    check = check_history(rows_after_kill, first.acknowledged)
    assert check["n_missing"] == 0 and check["duplicated"] == [], check  # every confirmed verdict is on disk, once

    restarted = Server(model_dir / "discs.dlens", f"sqlite:///{db}", tmp_path / "server2.log")  # the client retries what went unanswered
    try:
        unanswered = [n for n in range(600) if f"kill-{n:07d}" not in first.acknowledged]
        retry = run_load(restarted.url, "discs", images, 600, 8, run_id="kill", only=unanswered)
        assert retry.lost == 0
        final = check_history(history_rows(restarted.url, "kill"), {**first.acknowledged, **retry.acknowledged}, 600)
        assert final["ok"] and final["rows"] == 600 and final["requests_without_row"] == 0, final
        replayed = sum(1 for n in unanswered if retry.acknowledged[f"kill-{n:07d}"] in {r["id"] for r in rows_after_kill})
        assert replayed == check["unanswered_rows"] and final["unanswered_rows"] == 0  # committed-but-unanswered came back, not again
    finally:
        restarted.stop()


def _rows(store: HistoryStore) -> list[dict]:
    from defectlens.history.store import HistoryQuery

    return store.query(HistoryQuery(), limit=10_000)[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a POSIX process model")
def test_serve_refuses_bad_settings_in_one_line(model_dir, tmp_path):
    bad = [
        (["--db", "not a url"], "not a database URL"),
        ([str(tmp_path / "missing.dlens")], "model file not found"),
        (["--protect-inspect"], "needs an API key"),
    ]
    # started together: each spends its few seconds importing, not refusing
    runs = [(extra, phrase, subprocess.Popen([sys.executable, "-m", "defectlens", "serve", "--port", "1", "--db", f"sqlite:///{tmp_path / f'h{i}.db'}",
                                              *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                             env={**os.environ, "DEFECTLENS_API_KEYS": ""})) for i, (extra, phrase) in enumerate(bad)]
    for extra, phrase, proc in runs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and phrase in err and "Traceback" not in err, (extra, err)
