"""The REST API through FastAPI's test client: verdicts, history, thresholds, keys and limits."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from defectlens import Inspector
from defectlens.service.app import InspectionService, ServiceSettings, create_app

pytestmark = pytest.mark.integration  # the service, line loop, watcher or engines end to end: not for the fast lane

KEY = {"X-API-Key": "secret-1"}


def make_client(model_dir: Path, tmp_path: Path, **settings) -> TestClient:
    base = {"db_url": f"sqlite:///{tmp_path / 'history.db'}", "model_dir": model_dir, "models": [model_dir / "discs.dlens"],
            "api_keys": ["secret-1"]}
    return TestClient(create_app(InspectionService(ServiceSettings(**{**base, **settings}))))


@pytest.fixture()
def client(model_dir, tmp_path):
    return make_client(model_dir, tmp_path)


@pytest.fixture(scope="module")
def images(tiny_dataset) -> dict[str, Path]:
    return {"good": sorted((tiny_dataset / "test" / "good").iterdir())[0], "scratch": sorted((tiny_dataset / "test" / "scratch").iterdir())[0],
            "spot": sorted((tiny_dataset / "test" / "spot").iterdir())[0]}


def png(size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_status_health_readiness_and_schema(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"ready": True, "problems": [], "degraded": []}
    status = client.get("/api/status").json()
    assert [m["name"] for m in status["models"]] == ["discs"] and status["database"]["revision"] == "0002"
    assert status["auth"] == {"keys_configured": True, "inspect_requires_key": False, "read_requires_key": False,
                              "keys_per_role": {"viewer": 0, "operator": 0, "admin": 1}} and status["queue"]["in_flight"] == 0
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/models/{name}/inspect", "/api/models/{name}/inspect-batch", "/api/history", "/api/models/{name}/threshold"} <= set(paths)
    assert "multipart/form-data" in paths["/api/models/{name}/inspect"]["post"]["requestBody"]["content"]


def test_inspect_matches_the_library_and_is_recorded(client, model_dir, images):
    inspector = Inspector.load(model_dir / "discs.dlens")
    for name, path in images.items():
        data = path.read_bytes()
        answer = client.post("/api/models/discs/inspect", files={"file": (path.name, data, "image/png")}).json()
        expected = inspector.inspect(path)
        assert answer["score"] == pytest.approx(expected.score, abs=1e-6), name
        assert answer["verdict"] == expected.verdict and len(answer["regions"]) == len(expected.regions)
        assert answer["source"] == path.name and answer["model_checksum"] == inspector.bundle.checksum
        stored = client.get(f"/api/history/{answer['id']}").json()
        assert stored["score"] == answer["score"] and stored["verdict"] == answer["verdict"] and stored["regions"] == answer["regions"]
    assert client.get("/api/history").json()["total"] == 3


def test_raw_body_overlay_and_idempotent_retries(client, images):
    data = images["scratch"].read_bytes()
    first = client.post("/api/models/discs/inspect?overlay=true&source=cam1.png", content=data, headers={"Idempotency-Key": "line1-0001"})
    assert first.status_code == 200
    body = first.json()
    assert body["source"] == "cam1.png" and body["request_id"] == "line1-0001" and not body["replayed"]
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay"].split(",", 1)[1])))
    assert overlay.format == "PNG" and overlay.size == (body["width"], body["height"])
    again = client.post("/api/models/discs/inspect", content=data, headers={"Idempotency-Key": "line1-0001"}).json()
    assert again["id"] == body["id"] and again["replayed"]
    assert client.get("/api/history").json()["total"] == 1


def test_batch_reports_each_bad_file_in_place(client, images):
    files = [("files", ("a.png", images["good"].read_bytes(), "image/png")), ("files", ("broken.png", b"\x89PNG\r\n\x1a\nnope", "image/png")),
             ("files", ("b.png", images["spot"].read_bytes(), "image/png"))]
    out = client.post("/api/models/discs/inspect-batch", files=files, headers={"Idempotency-Key": "batch7"}).json()
    assert [r["source"] for r in out["results"]] == ["a.png", "b.png"]
    assert [r["request_id"] for r in out["results"]] == ["batch7-0", "batch7-2"]
    assert len(out["errors"]) == 1 and out["errors"][0]["index"] == 1 and "broken.png" in out["errors"][0]["error"]
    assert client.get("/api/history").json()["total"] == 2
    assert client.post("/api/models/discs/inspect-batch", files=files, headers={"Idempotency-Key": "batch7"}).json()["results"][0]["replayed"]
    assert client.get("/api/history").json()["total"] == 2


@pytest.mark.parametrize(("payload", "status", "phrase"), [
    (b"", 422, "empty file"),
    (b"not an image at all", 415, "not an image"),
    (png()[:60], 422, "corrupt or truncated"),
    (png(fmt="GIF"), 415, "GIF images are not accepted"),
    (png((3000, 3000)), 413, "pixel limit"),
])
def test_bad_images_get_one_line_json_errors(model_dir, tmp_path, payload, status, phrase):
    client = make_client(model_dir, tmp_path, max_pixels=4_000_000)
    response = client.post("/api/models/discs/inspect", content=payload)
    assert response.status_code == status
    body = response.json()
    assert phrase in body["error"] and "\n" not in body["error"] and body["status"] == status
    assert client.get("/api/history").json()["total"] == 0


def test_upload_byte_limit_holds_with_and_without_content_length(model_dir, tmp_path):
    client = make_client(model_dir, tmp_path, max_upload_bytes=10_000)
    big = png((400, 400), "BMP")
    assert client.post("/api/models/discs/inspect", content=big).status_code == 413
    assert client.post("/api/models/discs/inspect", files={"file": ("big.bmp", big, "image/bmp")}).status_code == 413

    def chunks():  # no Content-Length: the limit must count bytes as they arrive
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    response = client.post("/api/models/discs/inspect", content=chunks())
    assert response.status_code == 413 and "upload limit" in response.json()["error"]
    assert client.get("/api/history").json()["total"] == 0


def test_requests_cannot_reach_files_outside_the_model_folder(client, model_dir, tmp_path):
    outside = tmp_path / "secret.dlens"
    shutil.copy(model_dir / "discs.dlens", outside)
    for name in ("../secret", "..%2Fsecret", "%2e%2e%2fsecret", "/etc/passwd", "discs.dlens", ".hidden"):
        response = client.post(f"/api/models/{name}/load", headers=KEY)
        assert response.status_code in (404, 405), name
        assert "secret" not in [m["name"] for m in client.get("/api/models").json()["loaded"]]
    assert client.get("/api/models/unknown").status_code == 404
    assert client.post("/api/models/unknown/inspect", content=png()).status_code == 404


def test_state_changes_need_a_key(model_dir, tmp_path):
    client = make_client(model_dir, tmp_path)
    assert client.delete("/api/models/discs").status_code == 401
    assert client.delete("/api/models/discs", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.put("/api/models/discs/threshold", json={"threshold": 1.0}).status_code == 401
    assert client.delete("/api/models/discs", headers={"Authorization": "Bearer secret-1"}).status_code == 200
    assert client.post("/api/models/discs/inspect", content=png()).status_code == 404  # unloaded
    assert client.post("/api/models/discs/load", headers=KEY).json()["name"] == "discs"
    assert client.get("/api/models").json()["available"] == ["discs"]

    keyless = make_client(model_dir, tmp_path / "b", api_keys=[])
    response = keyless.post("/api/models/discs/load")
    assert response.status_code == 403 and "no API key configured" in response.json()["error"]
    assert keyless.post("/api/models/discs/inspect", content=png()).status_code == 200  # reading and inspecting stay open

    guarded = make_client(model_dir, tmp_path / "c", protect_inspect=True)
    assert guarded.post("/api/models/discs/inspect", content=png()).status_code == 401
    assert guarded.post("/api/models/discs/inspect", content=png(), headers=KEY).status_code == 200


def test_threshold_changes_are_recorded_reversible_and_survive_a_restart(model_dir, tmp_path, images):
    client = make_client(model_dir, tmp_path)
    data = images["good"].read_bytes()
    calibrated = client.get("/api/models/discs/threshold").json()["calibrated_threshold"]
    score = client.post("/api/models/discs/inspect", content=data).json()["score"]

    change = client.put("/api/models/discs/threshold", json={"threshold": score - 1e-3, "reason": "tighter for lot 42"}, headers=KEY).json()
    assert change["action"] == "set" and change["old_threshold"] == pytest.approx(calibrated) and change["actor"].startswith("key:")
    assert "secret" not in change["actor"]
    judged = client.post("/api/models/discs/inspect", content=data).json()
    assert judged["verdict"] == "defect" and judged["threshold"] == pytest.approx(score - 1e-3)

    restarted = make_client(model_dir, tmp_path)  # same database: the line keeps its threshold
    assert restarted.get("/api/models/discs/threshold").json()["threshold"] == pytest.approx(score - 1e-3)
    undo = restarted.post("/api/models/discs/threshold/undo", headers=KEY).json()
    assert undo["action"] == "undo" and undo["new_threshold"] == pytest.approx(calibrated)
    assert restarted.post("/api/models/discs/inspect", content=data).json()["threshold"] == pytest.approx(calibrated)
    restarted.put("/api/models/discs/threshold", json={"threshold": 5.0}, headers=KEY)
    reset = restarted.request("DELETE", "/api/models/discs/threshold", json={"reason": "end of trial"}, headers=KEY).json()
    assert reset["action"] == "reset" and reset["new_threshold"] == pytest.approx(calibrated) and reset["reason"] == "end of trial"
    history = restarted.get("/api/models/discs/threshold").json()["changes"]
    assert [c["action"] for c in history] == ["set", "undo", "set", "reset"]
    for bad in ({"threshold": "nan"}, {"threshold": "inf"}, {"reason": "no value"}):
        assert restarted.put("/api/models/discs/threshold", json=bad, headers=KEY).status_code == 422


def test_history_filters_paging_and_statistics(client, images):
    for i in range(5):
        client.post("/api/models/discs/inspect", content=images["good" if i % 2 else "scratch"].read_bytes(), headers={"Idempotency-Key": f"run-{i}"})
    everything = client.get("/api/history").json()
    assert everything["total"] == 5 and [r["request_id"] for r in everything["items"]] == [f"run-{i}" for i in range(4, -1, -1)]
    page = client.get("/api/history?limit=2&offset=2").json()
    assert page["total"] == 5 and [r["request_id"] for r in page["items"]] == ["run-2", "run-1"]
    verdicts = {v: client.get(f"/api/history?verdict={v}").json()["total"] for v in ("good", "defect")}
    assert sum(verdicts.values()) == 5
    assert client.get("/api/history?model=other").json()["total"] == 0
    newest = everything["items"][0]["created_at"]
    assert client.get("/api/history", params={"since": newest}).json()["total"] == 1
    assert client.get("/api/history", params={"until": newest}).json()["total"] == 4
    assert client.get("/api/history?verdict=maybe").status_code == 422
    assert client.get("/api/history?limit=100000").status_code == 422
    stats = client.get("/api/stats").json()
    assert stats["models"][0]["total"] == 5 and stats["models"][0]["defects"] == verdicts["defect"]
    assert sum(s["total"] for s in stats["series"]) == 5 and client.get("/api/stats?bucket=day").json()["series"][0]["bucket"].count("-") == 2


def test_kept_image_copies_are_served_back(model_dir, tmp_path, images):
    client = make_client(model_dir, tmp_path, image_dir=tmp_path / "kept")
    data = images["spot"].read_bytes()
    first = client.post("/api/models/discs/inspect", content=data).json()
    second = client.post("/api/models/discs/inspect", content=data).json()
    assert first["image_path"] == second["image_path"] and first["image_path"].endswith(".png")
    assert len(list((tmp_path / "kept").rglob("*.png"))) == 1  # content-addressed: stored once
    assert client.get(f"/api/history/{first['id']}/image").content == data
    assert client.get("/api/history/999/image").status_code == 404


def test_a_bad_model_or_database_is_a_clear_error(model_dir, tmp_path):
    from defectlens.errors import DefectLensError

    broken = tmp_path / "broken.dlens"
    broken.write_bytes(b"not a zip")
    with pytest.raises(DefectLensError, match="broken.dlens: not a DefectLens model"):
        InspectionService(ServiceSettings(db_url=f"sqlite:///{tmp_path / 'h.db'}", model_dir=tmp_path, models=[broken]))
    with pytest.raises(DefectLensError, match="not a database URL"):
        InspectionService(ServiceSettings(db_url="history.db", model_dir=model_dir))
    with pytest.raises(DefectLensError, match="nonsense://: cannot open the history database"):
        InspectionService(ServiceSettings(db_url="nonsense://", model_dir=model_dir))
    with pytest.raises(DefectLensError, match=r"postgresql\+psycopg://u:\*\*\*@127.0.0.1:9/x: cannot prepare the history database"):
        InspectionService(ServiceSettings(db_url="postgresql+psycopg://u:pw@127.0.0.1:9/x", model_dir=model_dir))
