"""`defectlens watch`: hot folders and video, exactly once across kills, and verdicts that survive
a broker or receiver outage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from defectlens.publish import Outbox
from defectlens.publish.outbox import DeliveryError
from defectlens.station.watch import FolderSource, Watcher

pytestmark = pytest.mark.integration  # the service, line loop, watcher or engines end to end: not for the fast lane

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def part_pngs(tiny_dataset) -> list[bytes]:
    return [p.read_bytes() for p in sorted((tiny_dataset / "test").rglob("*.png"))]


def drop(folder: Path, name: str, data: bytes) -> Path:
    """As a camera does it: write under a temporary name, then rename into place."""
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    return tmp.replace(folder / name)


def results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def run_until(watcher: Watcher, done, timeout: float = 60.0):
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while time.time() < deadline and not done():
        time.sleep(0.05)
    stop.set()
    thread.join(30)
    assert done(), "the watcher did not get there in time"


def test_a_hot_folder_is_inspected_once_each_moved_on_and_bad_files_set_aside(model_dir, tmp_path, part_pngs):
    src, out, done = tmp_path / "in", tmp_path / "out", tmp_path / "done"
    src.mkdir()
    for i, data in enumerate(part_pngs[:6]):
        drop(src, f"early{i}.png", data)  # already there when the watcher starts
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    # grace 1 s: the broken file was written a moment ago, and is tried again until it is 1 s old
    watcher = Watcher(model_dir / "discs.dlens", str(src), out, done=done, settle_s=0.2, overlays=False, grace_s=1.0)

    def later():
        time.sleep(0.5)
        for i, data in enumerate(part_pngs[6:12]):
            drop(src, f"late{i}.png", data)

    threading.Thread(target=later, daemon=True).start()
    run_until(watcher, lambda: len(results(out)) >= 13)
    records = results(out)
    assert len(records) == 13 and len({r["source"] for r in records}) == 13
    assert sorted(p.name for p in done.iterdir()) == sorted([f"early{i}.png" for i in range(6)] + [f"late{i}.png" for i in range(6)])
    assert (out / "errors" / "broken.png").is_file()
    reason = (out / "errors" / "broken.png.reason.txt").read_text()
    assert "broken.png" in reason and reason.count("\n") == 1
    assert not any(src.iterdir())


def test_a_writer_pausing_longer_than_the_settle_time_gets_its_file_inspected_whole(model_dir, tmp_path, part_pngs):
    """Half a PNG, unchanged for four settle times, looks complete: it is read, fails, and is
    given back; once the writer finishes it is inspected once, and nothing goes to errors/."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    watcher = Watcher(model_dir / "discs.dlens", str(src), out, settle_s=0.2, overlays=False, grace_s=5.0)

    def slow_writer():
        with open(src / "paused.png", "wb") as fh:  # written in place, not renamed: no close event until the end
            fh.write(part_pngs[0][: len(part_pngs[0]) // 2])
            fh.flush()
            time.sleep(0.8)
            while watcher.counts.retried == 0:  # the half file was read and given back
                time.sleep(0.05)
            fh.write(part_pngs[0][len(part_pngs[0]) // 2 :])

    threading.Thread(target=slow_writer, daemon=True).start()
    run_until(watcher, lambda: len(results(out)) >= 1)
    records = results(out)
    assert len(records) == 1 and records[0]["source"].endswith("paused.png") and "error" not in records[0]
    assert watcher.counts.retried >= 1 and watcher.counts.errors == 0
    assert not (out / "errors").exists() or not any((out / "errors").iterdir())


def test_a_file_still_being_written_waits_until_it_is_complete(tmp_path, part_pngs):
    src = tmp_path / "in"
    src.mkdir()
    source = FolderSource(src, settle_s=0.6)
    source.start()
    try:
        target = src / "slow.png"
        with open(target, "wb") as fh:
            fh.write(part_pngs[0][:100])
            fh.flush()
            assert source.ready(0.3) == []  # half written, and changed a moment ago
            time.sleep(0.2)
            fh.write(part_pngs[0][100:])
        found: list[Path] = []
        deadline = time.time() + 5
        while not found and time.time() < deadline:
            found = source.ready(0.2)  # closed after writing: ready at once
        assert found == [target] and target.stat().st_size == len(part_pngs[0])
        assert source.ready(0.3) == []  # handed out once only
    finally:
        source.stop()


def test_a_video_gives_one_record_per_sampled_frame(model_dir, tmp_path):
    import cv2

    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 64))
    rng = np.random.default_rng(0)
    for _ in range(30):  # 3 s at 10 frames/s
        writer.write((rng.random((64, 64, 3)) * 40 + 100).astype(np.uint8))
    writer.release()
    out = tmp_path / "out"
    Watcher(model_dir / "discs.dlens", str(video), out, fps=5.0, overlays=False).run()
    records = results(out)
    assert len(records) == 15 and records[0]["source"] == f"{video}#frame=00000000" and records[1]["source"].endswith("#frame=00000002")
    again = Watcher(model_dir / "discs.dlens", str(video), out, fps=5.0, overlays=False)
    assert again.run().skipped == 15 and len(results(out)) == 15  # a restart resumes: no frame twice


class Receiver(BaseHTTPRequestHandler):
    """A webhook receiver that is down (HTTP 503) for its first few requests."""

    failures = 3
    got: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 -- the http.server interface
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if Receiver.failures > 0:
            Receiver.failures -= 1
            self.send_response(503)
        else:
            Receiver.got.append(body)
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_the_outbox_keeps_order_through_a_receiver_outage_and_a_restart(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    Receiver.failures, Receiver.got = 3, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from defectlens.publish.transports import WebhookTransport

    try:
        hook = WebhookTransport(f"http://127.0.0.1:{server.server_port}/verdicts")
        box = Outbox(tmp_path / "box", hook.send)
        for i in range(5):
            box.put("discs", {"record_id": f"r{i}"})
        assert box.flush(30)
        box.close()
        assert [m["record_id"] for m in Receiver.got] == [f"r{i}" for i in range(5)]
        assert [m["message_id"] for m in Receiver.got] == [1, 2, 3, 4, 5]

        def down(_message):
            raise DeliveryError("receiver away")

        box = Outbox(tmp_path / "box", down)  # the process stops while the receiver is away
        box.put("discs", {"record_id": "r5"})
        box.put("discs", {"record_id": "r6"})
        box.close(timeout=0.5)
        box = Outbox(tmp_path / "box", hook.send)  # restarted: what was never acknowledged goes out, in order, numbered on
        assert box.flush(30)
        box.close()
        assert [m["record_id"] for m in Receiver.got] == [f"r{i}" for i in range(7)]
        assert [m["message_id"] for m in Receiver.got][-2:] == [6, 7]
    finally:
        server.shutdown()




def _watch_cmd(model: Path, src: Path, out: Path, done: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "defectlens", "watch", str(model), str(src), "--out", str(out), "--done", str(done),
            "--settle", "0.2", "--no-overlay", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.slow
def test_1000_files_exactly_once_with_the_watcher_killed_twice(model_dir, tmp_path, part_pngs):
    src, out, done = tmp_path / "in", tmp_path / "out", tmp_path / "done"
    src.mkdir()
    log = (tmp_path / "watch.log").open("ab")
    n = 1000

    def dropper():
        for i in range(n):
            drop(src, f"part{i:04d}.png", part_pngs[i % len(part_pngs)])
            if i % 50 == 0:
                time.sleep(0.05)

    feeding = threading.Thread(target=dropper, daemon=True)
    feeding.start()
    cmd = _watch_cmd(model_dir / "discs.dlens", src, out, done)
    for kill_at in (250, 600):
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
        deadline = time.time() + 120
        while len(results(out)) < kill_at and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert len(results(out)) >= kill_at, (tmp_path / "watch.log").read_text()[-2000:]
    feeding.join(60)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
    deadline = time.time() + 180
    while (len(results(out)) < n or any(src.iterdir())) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    records = results(out)
    sources = [Path(r["source"]).name for r in records]
    assert len(records) == n and len(set(sources)) == n and "error" not in {k for r in records for k in r}
    assert len(list(done.iterdir())) == n and not any(src.iterdir())


@pytest.mark.slow
def test_every_verdict_reaches_the_plant_through_a_broker_restart(model_dir, tmp_path, part_pngs, mosquitto):
    import paho.mqtt.client as mqtt

    got: list[dict] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plant-mes", clean_session=False)  # the broker keeps its queue
    sub.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    sub.on_connect = lambda c, u, f, rc, p=None: c.subscribe("line1/#", qos=1)
    sub.reconnect_delay_set(1, 2)
    sub.connect("127.0.0.1", mosquitto.port)
    sub.loop_start()
    src, out, done = tmp_path / "in", tmp_path / "out", tmp_path / "done"
    src.mkdir()
    cmd = _watch_cmd(model_dir / "discs.dlens", src, out, done, "--publish", f"mqtt://127.0.0.1:{mosquitto.port}/line1")
    proc = subprocess.Popen(cmd, stdout=(tmp_path / "watch.log").open("ab"), stderr=subprocess.STDOUT, env=_env())
    try:
        n = 60
        for i in range(n):
            drop(src, f"part{i:03d}.png", part_pngs[i % len(part_pngs)])
            if i == 20:
                deadline = time.time() + 60
                while len(results(out)) < 15 and time.time() < deadline:
                    time.sleep(0.05)
                mosquitto.stop()  # the broker goes away mid-run
            if i == 40:
                time.sleep(1.0)
                mosquitto.start()  # and comes back on the same port
            time.sleep(0.02)
        deadline = time.time() + 120
        while len({m["record_id"] for m in got}) < n and time.time() < deadline:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        sub.loop_stop()
    ids = [m["record_id"] for m in got]
    missing = sorted({str((src / f"part{i:03d}.png").resolve()) for i in range(n)} - {m["source"] for m in got})
    assert len(set(ids)) == n, f"missing {missing}; broker log {mosquitto.log}, watcher log {tmp_path / 'watch.log'}"  # none missing
    assert {m["source"] for m in got} == {str((src / f"part{i:03d}.png").resolve()) for i in range(n)}
    assert all(m["model"] == "discs" and m["verdict"] in ("good", "defect") for m in got)
    message_ids = [m["message_id"] for m in got]
    assert sorted(set(message_ids)) == list(range(1, n + 1))  # repeats, if any, carry the id they had: a consumer drops them
