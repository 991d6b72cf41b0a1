"""Dynamic batching: concurrent requests to one model share a forward pass.

One image at a time leaves most of a CPU's throughput unused (a batch of eight costs far less than
eight single passes), and a lock per model makes requests queue behind each other anyway. So
requests to a model wait together for at most ``max_wait_ms`` after the first of them, then go
through ``Inspector.inspect_many`` as one batch. The queue is bounded: when it is full a request is
refused at once with a retry time (HTTP 503 and Retry-After) instead of letting every latency grow,
and a request still queued after ``timeout_s`` is given up before it is scored. Either way
nothing is recorded for it, so the history holds exactly the answered requests, and a client that
retries with the same request id gets one row.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from defectlens.errors import DefectLensError

IDLE_S = 1.0  # a batcher's thread ends after this long without work, and starts again on the next request


def _own_copy(exc: BaseException) -> BaseException:
    """The pass's failure as an exception of this request's own: every request of a failed pass
    raises it in its own thread, and one shared object would have its traceback rewritten by each.
    Same type and message, so the service answers each as it would the original."""
    try:
        own = copy.copy(exc)
    except Exception:  # noqa: BLE001 -- an exception that cannot be rebuilt from its args is raised as it is
        return exc
    return own if type(own) is type(exc) and str(own) == str(exc) else exc


class Busy(DefectLensError):
    """The model's queue is full, or a request waited past its timeout: try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class BatchSettings:
    max_batch: int = 8  # images in one forward pass
    max_wait_ms: float = 3.0  # how long the first request of a batch waits for others
    max_queue: int = 64  # requests waiting per model before new ones are refused
    timeout_s: float = 30.0  # a request waiting longer is given up

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise DefectLensError("batching needs max_batch >= 1, max_queue >= 1, max_wait_ms >= 0 and timeout_s > 0")


@dataclass
class _Job:
    item: Any
    arrived: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    batch: int = 0  # size of the batch it went in
    started: float = 0.0  # when its pass began (0: still queued)


class Batcher:
    """Gathers ``submit`` calls into batches for ``run`` (items in, one result per item out, in order)."""

    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], settings: BatchSettings | None = None) -> None:
        self.run = run
        self.settings = settings or BatchSettings()
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._batch_seconds = 0.05  # running mean of one batch's time: what Retry-After is made of
        self.batches = 0
        self.items = 0
        self.running = 0  # requests in the pass now running
        self._admitted = 0  # requests between admit() and their release

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def capacity(self) -> int:
        """Requests admitted at once: a full queue plus a pass."""
        return self.settings.max_queue + self.settings.max_batch

    def admit(self) -> Callable[[], None]:
        """Take a place before the request takes a worker thread (so a flood is refused at once
        instead of waiting, unbounded, for threads); returns the call that gives it back."""
        with self._cond:
            if self._admitted >= self.capacity:
                raise Busy(f"the model is busy: {self._admitted} requests are in hand; try again shortly", self._retry_after())
            self._admitted += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._cond:
                if not released:
                    released, self._admitted = True, self._admitted - 1

        return release

    def submit(self, item: Any) -> tuple[Any, float, int]:
        """The item's result, the milliseconds it waited before its batch started, and the batch's size."""
        s = self.settings
        job = _Job(item)
        with self._cond:
            if len(self._queue) >= s.max_queue:
                raise Busy(f"the model is busy: {len(self._queue)} requests are waiting; try again shortly", self._retry_after())
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="defectlens-batcher", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        if not job.done.wait(s.timeout_s):
            with self._cond:
                if not job.started:  # still queued: taken out, never scored
                    self._queue.remove(job)
                    raise Busy(f"the model did not get to this request within {s.timeout_s:g} s; try again", self._retry_after())
            job.done.wait()  # already in a pass, which ends: its answer is on the way
        if job.error is not None:
            raise _own_copy(job.error) from job.error
        return job.result, (job.started - job.arrived) * 1000.0, job.batch

    def _retry_after(self) -> float:
        batches_ahead = len(self._queue) / self.settings.max_batch + 1
        return max(1.0, round(batches_ahead * self._batch_seconds, 1))

    def _take(self) -> list[_Job] | None:
        """The next batch: up to max_batch jobs, once the first has waited max_wait_ms or the batch is full."""
        s = self.settings
        with self._cond:
            idle_since = time.perf_counter()
            while not self._queue:
                left = IDLE_S - (time.perf_counter() - idle_since)
                if left <= 0:
                    self._thread = None  # the next submit starts a new thread
                    return None
                self._cond.wait(left)
            deadline = self._queue[0].arrived + s.max_wait_ms / 1000.0
            while len(self._queue) < s.max_batch and (left := deadline - time.perf_counter()) > 0:
                self._cond.wait(left)
            jobs = [self._queue.popleft() for _ in range(min(s.max_batch, len(self._queue)))]
            now = time.perf_counter()
            for job in jobs:
                job.started, job.batch = now, len(jobs)
            self.running = len(jobs)
            return jobs

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            t0 = time.perf_counter()
            try:
                results = list(self.run([job.item for job in jobs]))
                if len(results) != len(jobs):
                    raise RuntimeError(f"a batch of {len(jobs)} gave {len(results)} results")
            except BaseException as exc:  # noqa: BLE001 -- every waiting request hears of the failure, none hangs
                for job in jobs:
                    job.error = exc
                    job.done.set()
                self.running = 0
                continue
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - t0)
            self.batches += 1
            self.items += len(jobs)
            for job, result in zip(jobs, results, strict=True):
                job.result = result
                job.done.set()
            self.running = 0
