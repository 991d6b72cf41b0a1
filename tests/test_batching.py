"""Dynamic batching: concurrent requests share a pass, a full queue answers 503 with Retry-After,
a request that waits too long is given up unrecorded, and history keeps one row per request."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from defectlens.service.batching import Batcher, BatchSettings, Busy

from .test_service_api import make_client

pytestmark = pytest.mark.integration  # the service, line loop, watcher or engines end to end: not for the fast lane


def test_concurrent_requests_share_passes_and_each_gets_its_own_result():
    sizes: list[int] = []

    def run(items):
        sizes.append(len(items))
        time.sleep(0.01)
        return [item * 10 for item in items]

    batcher = Batcher(run, BatchSettings(max_batch=4, max_wait_ms=20))
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(batcher.submit, range(32)))
    assert [result for result, _, _ in answers] == [i * 10 for i in range(32)]
    assert max(sizes) == 4 and sum(sizes) == 32 and len(sizes) < 32  # shared passes, never over the limit
    assert all(1 <= batch <= 4 and waited >= 0 for _, waited, batch in answers)


def test_a_full_queue_is_refused_at_once_with_a_retry_time():
    release, started = threading.Event(), threading.Event()

    def run(items):
        started.set()
        release.wait(5)
        return items

    batcher = Batcher(run, BatchSettings(max_batch=1, max_wait_ms=0, max_queue=2))
    with ThreadPoolExecutor(3) as pool:
        # one in the pass before the two that wait are sent: sent together on a busy machine, the
        # third could find the first still queued, and be the one refused
        running = [pool.submit(batcher.submit, 0)]
        assert started.wait(5)
        running += [pool.submit(batcher.submit, i) for i in (1, 2)]
        deadline = time.monotonic() + 5
        while batcher.depth < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.perf_counter()
        with pytest.raises(Busy, match="busy: 2 requests are waiting") as refused:
            batcher.submit(99)
        assert time.perf_counter() - t0 < 0.5 and refused.value.retry_after >= 1
        release.set()
        assert sorted(f.result()[0] for f in running) == [0, 1, 2]


def test_a_request_still_queued_at_its_timeout_is_given_up_unscored():
    seen: list[list[int]] = []

    def run(items):
        seen.append(list(items))
        time.sleep(1.5)
        return items

    batcher = Batcher(run, BatchSettings(max_batch=1, max_wait_ms=0, timeout_s=0.6))
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher.submit, 1)  # holds the model 1.5 s: past its own timeout, but in a pass, so answered
        time.sleep(0.2)
        with pytest.raises(Busy, match="within 0.6 s"):
            batcher.submit(2)  # queued behind it past the timeout
        assert first.result()[0] == 1
    time.sleep(0.1)
    assert seen == [[1]]  # the given-up request was taken out of the queue before it was scored


def test_a_failing_pass_fails_every_request_in_it():
    def run(items):
        raise RuntimeError("backbone exploded")

    batcher = Batcher(run, BatchSettings(max_batch=8, max_wait_ms=30))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(batcher.submit, i) for i in range(4)]
        errors = []
        for f in futures:
            with pytest.raises(RuntimeError, match="exploded") as caught:
                f.result()
            errors.append(caught.value)
    # each request raises an exception of its own (one shared object would carry every thread's traceback)
    assert len({id(e) for e in errors}) == 4 and all(type(e) is RuntimeError for e in errors)
    assert all(e.__cause__ is not e and str(e.__cause__) == "backbone exploded" for e in errors)  # the pass's failure, kept as the cause


def test_the_service_batches_concurrent_requests_and_records_each_once(model_dir, tmp_path, tiny_dataset):
    client = make_client(model_dir, tmp_path, batching=BatchSettings(max_batch=8, max_wait_ms=20))
    paths = sorted((tiny_dataset / "test").rglob("*.png"))[:8] * 3

    def send(k):
        path = paths[k]
        return client.post("/api/models/discs/inspect", files={"file": (path.name, path.read_bytes(), "image/png")},
                           headers={"Idempotency-Key": f"req-{k}"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(len(paths))))
    assert all(a.status_code == 200 for a in answers)
    rows = client.get("/api/history", params={"limit": 100}).json()["items"]
    assert sorted(r["request_id"] for r in rows) == sorted(f"req-{k}" for k in range(len(paths)))
    metrics = client.get("/metrics").text
    count = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith('defectlens_batch_size_count{model="discs"}'))
    total = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith('defectlens_batch_size_sum{model="discs"}'))
    assert count == len(paths) and total > count  # some requests shared a pass


def test_the_service_answers_503_with_retry_after_when_the_queue_is_full(model_dir, tmp_path, tiny_dataset):
    client = make_client(model_dir, tmp_path, batching=BatchSettings(max_batch=1, max_wait_ms=0, max_queue=1))
    model = client.app.state.service.registry.get("discs")
    path = sorted((tiny_dataset / "test" / "good").iterdir())[0]
    data = path.read_bytes()
    def post():
        return client.post("/api/models/discs/inspect", files={"file": ("a.png", data, "image/png")})

    def until(condition):
        deadline = time.monotonic() + 10
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)

    with ThreadPoolExecutor(2) as pool:  # noqa: SIM117 -- the pool must outlive the lock, or its exit waits on requests the lock holds
        with model.lock:  # the model is busy: one request waits in the pass, the next in the queue
            waiting = [pool.submit(post)]
            until(lambda: model.batcher.running == 1)
            waiting.append(pool.submit(post))
            until(lambda: model.batcher.depth == 1)
            refused = client.post("/api/models/discs/inspect", files={"file": ("b.png", data, "image/png")})
        answered = [w.result().status_code for w in waiting]
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1 and "busy" in refused.json()["error"]
    assert answered == [200, 200]
    assert client.get("/api/history", params={"limit": 10}).json()["total"] == 2  # the refused request left no row


def test_requests_beyond_what_the_queue_can_hold_are_refused_before_they_take_a_thread():
    batcher = Batcher(lambda items: items, BatchSettings(max_batch=2, max_queue=3))
    releases = [batcher.admit() for _ in range(batcher.capacity)]
    with pytest.raises(Busy, match="5 requests are in hand"):
        batcher.admit()
    releases[0]()
    releases[0]()  # giving a place back twice frees it once
    again = batcher.admit()
    with pytest.raises(Busy):
        batcher.admit()
    again()
