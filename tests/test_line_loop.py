"""The line loop through the REST API: feedback that teaches a new model version, rollback, roles,
the audit log, drift and metrics."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from defectlens.data.images import load_rgb
from defectlens.service.app import InspectionService, ServiceSettings, create_app

pytestmark = pytest.mark.integration  # the service, line loop, watcher or engines end to end: not for the fast lane

ADMIN = {"X-API-Key": "boss"}
OPERATOR = {"X-API-Key": "op-1"}
VIEWER = {"X-API-Key": "look"}
KEYS = ["boss", "operator:op-1", "viewer:look"]


def moved_png(path: Path, gain: float = 1.35, offset: float = 0.08) -> bytes:
    rgb = np.clip(load_rgb(path) * gain + offset, 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def line(model_dir, tmp_path):
    """A service on a private copy of the model folder (versions are written next to the model)."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(model_dir / "discs.dlens", models / "discs.dlens")
    settings = ServiceSettings(db_url=f"sqlite:///{tmp_path / 'history.db'}", model_dir=models, models=[models / "discs.dlens"],
                               api_keys=KEYS, image_dir=tmp_path / "images")
    return settings


def client_for(settings: ServiceSettings) -> TestClient:
    return TestClient(create_app(InspectionService(settings)))


def inspect(client: TestClient, data: bytes, name: str = "part.png") -> dict:
    answer = client.post("/api/models/discs/inspect", files={"file": (name, data, "image/png")})
    assert answer.status_code == 200, answer.text
    return answer.json()


def shifted_goods(tiny_dataset) -> list[bytes]:
    goods = sorted((tiny_dataset / "train" / "good").iterdir()) + sorted((tiny_dataset / "test" / "good").iterdir())
    return [moved_png(p) for p in goods]


def test_feedback_needs_an_operator_and_never_changes_the_verdict(line, images_of):
    client = client_for(line)
    row = inspect(client, images_of["scratch"])
    url = f"/api/history/{row['id']}/feedback"
    assert client.post(url, json={"label": "defect"}).status_code == 401
    refused = client.post(url, json={"label": "defect"}, headers=VIEWER)
    assert refused.status_code == 403 and "operator role" in refused.json()["error"]
    assert client.post(url, json={"label": "maybe"}, headers=OPERATOR).status_code == 422
    given = client.post(url, json={"label": "defect", "note": "scratch at 3 o'clock"}, headers=OPERATOR).json()
    assert given["feedback"]["status"] == "recorded" and given["learning"] is None
    assert given["feedback"]["actor"].startswith("key:") and given["feedback"]["note"] == "scratch at 3 o'clock"
    assert client.get(f"/api/history/{row['id']}").json()["verdict"] == row["verdict"]
    assert [f["label"] for f in client.get(url).json()["items"]] == ["defect"]
    assert client.post("/api/history/999999/feedback", json={"label": "good"}, headers=OPERATOR).status_code == 404


def test_a_confirmed_good_part_teaches_a_new_version_and_rollback_restores_the_old_scores(line, tiny_dataset):
    client = client_for(line)
    shifted = shifted_goods(tiny_dataset)
    first = [inspect(client, data, f"moved{i}.png") for i, data in enumerate(shifted)]
    rejected = [r for r in first if r["verdict"] == "defect"]
    assert len(rejected) >= 6, "the simulated move should make many good parts fail"
    taught = rejected[:3]
    for r in taught:
        answer = client.post(f"/api/history/{r['id']}/feedback", json={"label": "good", "note": "new lamp"}, headers=OPERATOR).json()
        assert answer["learning"]["status"] == "learned", answer
        assert answer["feedback"]["status"] == "learned" and answer["feedback"]["model_checksum"] == answer["learning"]["model"]["checksum"]
    running = client.get("/api/models/discs").json()
    assert running["version"] == 4 and running["file"] == "discs.v4.dlens" and running["parent"] == "discs.v3.dlens"
    assert (line.model_dir / "discs.v2.dlens").is_file() and (line.model_dir / "discs.dlens").is_file()
    assert running["threshold"] == pytest.approx(first[0]["threshold"])  # the threshold is kept, and re-checked
    recheck = answer["learning"]["recheck"]
    assert recheck is not None and recheck["n"] > 0 and recheck["expected_frr_after"] <= recheck["expected_frr_before"] + 1e-9
    others = [i for i, r in enumerate(first) if r["id"] not in {t["id"] for t in taught}]
    again = {i: inspect(client, shifted[i]) for i in others}
    before_frr = np.mean([first[i]["verdict"] == "defect" for i in others])
    after_frr = np.mean([again[i]["verdict"] == "defect" for i in others])
    assert after_frr < before_frr and all(again[i]["score"] <= first[i]["score"] + 1e-6 for i in others)
    # rollback, three times, lands on the fitted model and gives its scores exactly
    for expected in ("discs.v3.dlens", "discs.v2.dlens", "discs.dlens"):
        back = client.post("/api/models/discs/rollback", headers=ADMIN)
        assert back.status_code == 200 and back.json()["file"] == expected
    assert client.post("/api/models/discs/rollback", headers=ADMIN).status_code == 409
    assert inspect(client, shifted[others[0]])["score"] == first[others[0]]["score"]
    assert client.post("/api/models/discs/rollback", headers=OPERATOR).status_code == 403
    switches = client.get("/api/models/discs/versions").json()["switches"]
    assert [s["action"] for s in switches] == ["learn"] * 3 + ["rollback"] * 3


def test_a_restart_runs_the_version_that_was_running(line, tiny_dataset):
    client = client_for(line)
    row = next(r for r in (inspect(client, d) for d in shifted_goods(tiny_dataset)) if r["verdict"] == "defect")
    client.post(f"/api/history/{row['id']}/feedback", json={"label": "good"}, headers=OPERATOR)
    assert client_for(line).get("/api/models/discs").json()["file"] == "discs.v2.dlens"
    client.post("/api/models/discs/rollback", headers=ADMIN)
    assert client_for(line).get("/api/models/discs").json()["file"] == "discs.dlens"


def test_feedback_that_cannot_teach_is_queued_with_its_reason(line, tiny_dataset, monkeypatch):
    without_copies = ServiceSettings(**{**vars(line), "image_dir": None})
    client = client_for(without_copies)
    row = inspect(client, shifted_goods(tiny_dataset)[0])
    answer = client.post(f"/api/history/{row['id']}/feedback", json={"label": "good"}, headers=OPERATOR).json()
    assert answer["learning"]["status"] == "queued" and "--keep-images" in answer["learning"]["reason"]
    assert answer["feedback"]["status"] == "queued"

    from defectlens.detectors.patchcore import PatchCore

    monkeypatch.setattr(PatchCore, "learns_incrementally", property(lambda self: False))
    client = client_for(line)
    row = inspect(client, shifted_goods(tiny_dataset)[1])
    answer = client.post(f"/api/history/{row['id']}/feedback", json={"label": "good"}, headers=OPERATOR).json()
    assert answer["learning"]["status"] == "queued" and "cannot learn without a refit" in answer["learning"]["reason"]
    monkeypatch.undo()
    client = client_for(ServiceSettings(**{**vars(line), "learn": False}))  # serve --no-learn: a person approves changes
    row = inspect(client, shifted_goods(tiny_dataset)[2])
    answer = client.post(f"/api/history/{row['id']}/feedback", json={"label": "good"}, headers=OPERATOR).json()
    assert answer["learning"]["status"] == "queued" and "--no-learn" in answer["learning"]["reason"]
    queued = client.get("/api/feedback?status=queued").json()["items"]
    assert len(queued) == 3 and not list(line.model_dir.glob("discs.v*.dlens"))


def test_roles_and_the_audit_log(line):
    client = client_for(line)
    assert client.put("/api/models/discs/threshold", json={"threshold": 1.0}, headers=OPERATOR).status_code == 403
    assert client.put("/api/models/discs/threshold", json={"threshold": 1.0}, headers=VIEWER).status_code == 403
    assert client.put("/api/models/discs/threshold", json={"threshold": 1.0, "reason": "trial"}, headers=ADMIN).status_code == 200
    assert client.post("/api/models/discs/threshold/undo", headers=ADMIN).status_code == 200
    entries = client.get("/api/audit").json()["items"]
    assert [e["action"] for e in entries] == ["threshold.undo", "threshold.set"]
    assert entries[1]["role"] == "admin" and entries[1]["details"]["reason"] == "trial"
    protected = client_for(ServiceSettings(**{**vars(line), "protect_read": True}))
    assert protected.get("/api/history").status_code == 401
    assert protected.get("/api/history", headers=VIEWER).status_code == 200
    assert protected.get("/health").status_code == 200  # liveness stays open for the orchestrator


def test_a_threshold_change_with_the_database_away_changes_nothing(line, monkeypatch):
    """The change and its audit entry are one transaction, stored before the line judges by it:
    a database that is away refuses the request, and the threshold stays as it was (an unload too)."""
    from defectlens.history.store import HistoryStore, StoreUnavailable

    client = client_for(line)
    before = client.get("/api/models/discs/threshold").json()["threshold"]

    def away(self, *args, **kwargs):
        raise StoreUnavailable("history database unavailable (connection refused)")

    monkeypatch.setattr(HistoryStore, "_insert", away)
    answer = client.put("/api/models/discs/threshold", json={"threshold": before * 2, "reason": "outage"}, headers=ADMIN)
    assert answer.status_code == 503 and "unavailable" in answer.json()["error"]
    assert client.delete("/api/models/discs", headers=ADMIN).status_code == 503  # nor is a model unloaded unaudited
    assert [m["name"] for m in client.get("/api/models").json()["loaded"]] == ["discs"]
    monkeypatch.undo()
    assert client.get("/api/models/discs/threshold").json()["threshold"] == before
    assert client.get("/api/audit").json()["items"] == []
    assert client.put("/api/models/discs/threshold", json={"threshold": before * 2, "reason": "back"}, headers=ADMIN).status_code == 200
    assert client.get("/api/models/discs/threshold").json()["threshold"] == before * 2
    assert [e["action"] for e in client.get("/api/audit").json()["items"]] == ["threshold.set"]


def test_drift_status_and_metrics(line, tiny_dataset):
    client = client_for(line)
    for data in shifted_goods(tiny_dataset)[:12]:
        inspect(client, data)
    drift = client.get("/api/models/discs/drift").json()
    assert drift["state"] in ("ok", "warning", "drift") and drift["n"] == 12 and len(drift["series"]) == 12
    assert "collecting" in drift["reasons"][0]  # 12 of the 30 needed
    status = client.get("/api/status").json()
    assert status["models"][0]["drift"] == "ok"
    text = client.get("/metrics").text
    assert 'defectlens_inspections_total{model="discs",verdict=' in text
    assert 'defectlens_inspection_seconds_count{model="discs"} 12.0' in text
    assert "defectlens_queue_in_flight 0.0" in text and 'defectlens_drift_state{model="discs"}' in text


@pytest.fixture(scope="module")
def images_of(tiny_dataset) -> dict[str, bytes]:
    return {"scratch": sorted((tiny_dataset / "test" / "scratch").iterdir())[0].read_bytes()}


def test_calibrate_from_history_uses_the_defects_operators_confirmed(line, tiny_dataset, tmp_path, capsys):
    from defectlens.bundle import Bundle
    from defectlens.cli import main

    client = client_for(line)
    marked = []
    for kind in ("scratch", "spot"):
        for path in sorted((tiny_dataset / "test" / kind).iterdir())[:3]:
            row = inspect(client, path.read_bytes(), path.name)
            answer = client.post(f"/api/history/{row['id']}/feedback", json={"label": "defect", "defect_type": kind}, headers=OPERATOR)
            assert answer.status_code == 200 and answer.json()["feedback"]["defect_type"] == kind
            marked.append(row["id"])
    # an operator's later word wins: the last one is good after all
    client.post(f"/api/history/{marked[-1]}/feedback", json={"label": "good"}, headers=OPERATOR)
    assert client.post(f"/api/history/{marked[0]}/feedback", json={"label": "good", "defect_type": "dent"},
                       headers=OPERATOR).status_code == 400
    out = tmp_path / "recalibrated.dlens"
    db = line.db_url
    assert main(["calibrate", str(line.model_dir / "discs.dlens"), "--from-history", db, "--images", str(line.image_dir),
                 "--strategy", "f1", "-o", str(out)]) == 0
    assert "5 defects confirmed on the line" in capsys.readouterr().out
    cal = Bundle.load(out).calibration
    assert cal.n_defect == 5 and cal.strategy == "f1" and set(cal.per_type) == {"scratch", "spot"}
    assert Bundle.load(out).typer is not None
    assert main(["calibrate", str(out), "--from-history", f"sqlite:///{tmp_path / 'none.db'}", "--images", str(tmp_path)]) == 2
