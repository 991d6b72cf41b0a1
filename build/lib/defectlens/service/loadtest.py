"""A bounded load test against a running service, and a check that the history kept every answer.

Each request carries its own idempotency key (``<run id>-<n>``), so afterwards the history can be
asked for exactly this run's rows: every answered request must have one row with the id it was
told, and no request may have two.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np


@dataclass
class LoadResult:
    run_id: str
    requests: int
    concurrency: int
    ok: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    failures: Counter = field(default_factory=Counter)
    acknowledged: dict[str, int] = field(default_factory=dict)  # request id -> history id the client was told
    verdicts: Counter = field(default_factory=Counter)
    check: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.requests - self.ok

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "run_id": self.run_id,
            "requests": self.requests,
            "concurrency": self.concurrency,
            "ok": self.ok,
            "lost": self.lost,
            "failures": dict(self.failures),
            "seconds": round(self.seconds, 2),
            "requests_per_s": round(self.ok / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "max_ms": round(float(lat.max()), 1),
            "verdicts": dict(self.verdicts),
            "history_check": self.check,
        }


def run_load(url: str, model: str, images: list[bytes], requests: int = 2000, concurrency: int = 8, api_key: str | None = None,
             timeout: float = 120.0, run_id: str | None = None, only: list[int] | None = None) -> LoadResult:
    """Send ``requests`` inspections from ``concurrency`` threads, cycling through ``images``.

    ``only`` re-sends just those request numbers with the same keys: a client retrying after a crash.
    """
    if not images:
        raise ValueError("the load test needs at least one image")
    result = LoadResult(run_id or uuid.uuid4().hex[:12], requests, concurrency)
    todo = iter(range(requests) if only is None else only)
    lock = threading.Lock()
    headers = {"content-type": "application/octet-stream", **({"X-API-Key": api_key} if api_key else {})}
    endpoint = f"{url.rstrip('/')}/api/models/{model}/inspect"

    def worker() -> None:
        with httpx.Client(timeout=timeout) as client:
            while True:
                with lock:
                    n = next(todo, None)
                if n is None:
                    return
                key = f"{result.run_id}-{n:07d}"
                t0 = time.perf_counter()
                try:
                    response = client.post(endpoint, content=images[n % len(images)], headers={**headers, "Idempotency-Key": key})
                except httpx.HTTPError as exc:
                    with lock:
                        result.failures[type(exc).__name__] += 1
                    continue
                ms = (time.perf_counter() - t0) * 1000.0
                with lock:
                    if response.status_code == 200:
                        body = response.json()
                        result.ok += 1
                        result.latencies_ms.append(ms)
                        result.acknowledged[key] = body["id"]
                        result.verdicts[body["verdict"]] += 1
                    else:
                        result.failures[f"HTTP {response.status_code}"] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    result.seconds = time.perf_counter() - t0
    if only is not None:
        result.requests = len(only)
    return result


def history_rows(url: str, run_id: str, page: int = 500) -> list[dict[str, Any]]:
    """Every history row of one run, through the public API."""
    rows: list[dict[str, Any]] = []
    with httpx.Client(timeout=60.0) as client:
        while True:
            response = client.get(f"{url.rstrip('/')}/api/history", params={"request_prefix": f"{run_id}-", "limit": page, "offset": len(rows)})
            response.raise_for_status()
            items = response.json()["items"]
            rows += items
            if len(items) < page:
                return rows


def check_history(rows: list[dict[str, Any]], acknowledged: dict[str, int], requests: int | None = None) -> dict[str, Any]:
    """Missing: told an id the history lacks. Duplicated: one request with two rows.
    Unanswered: rows the client never heard about (committed, then the answer was lost)."""
    per_request = Counter(r["request_id"] for r in rows)
    by_request = {r["request_id"]: r["id"] for r in rows}
    missing = sorted(k for k, i in acknowledged.items() if by_request.get(k) != i)
    check = {
        "rows": len(rows),
        "missing": missing[:20],
        "n_missing": len(missing),
        "duplicated": sorted(k for k, n in per_request.items() if n > 1)[:20],
        "unanswered_rows": len(set(by_request) - set(acknowledged)),
    }
    if requests is not None:
        check["requests_without_row"] = requests - len(by_request)
    check["ok"] = not missing and not check["duplicated"]
    return check
