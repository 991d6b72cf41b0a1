"""A local outbox: every verdict is on disk before anyone is told, and leaves in order.

The line must not lose a verdict because the broker restarted or the MES receiver was down. A
message is appended (and fsynced) to ``messages.jsonl`` under the next sequence number; one
sender thread delivers messages strictly in that order and, only once the receiver has
acknowledged one, records its number in ``sent`` (written atomically). After an outage, or a
restart of the whole process, delivery resumes at the first unacknowledged message. A message
whose acknowledgement was lost is sent again with the same ``message_id``. Delivery is at least
once; a consumer that drops repeats by the payload's ``record_id`` (the part's one id, the same
when a part is redone after a kill and published under a new ``message_id``) sees each part once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from defectlens.errors import DefectLensError
from defectlens.jsonutil import finite

log = logging.getLogger("defectlens.publish")
BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)  # waits between retries of the same message, then 10 s each


class DeliveryError(DefectLensError):
    """The receiver did not take a message (it is retried; nothing is lost)."""


Send = Callable[[dict[str, Any]], None]  # raises DeliveryError (or OSError) when the message was not acknowledged


class Outbox:
    def __init__(self, folder: Path, send: Send, name: str = "outbox") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self._send = send
        self._messages = self.folder / "messages.jsonl"
        self._sent_file = self.folder / "sent"
        self._cond = threading.Condition()
        self._pending: deque[dict[str, Any]] = deque()
        self._stop = False
        self.failures = 0
        self.last_error: str | None = None
        self.sent = self._read_sent()
        self.next_id = self._load() + 1
        self._fh = open(self._messages, "a", encoding="utf-8")  # noqa: SIM115 -- closed in close()
        self._thread = threading.Thread(target=self._deliver, name=f"outbox-{name}", daemon=True)
        self._thread.start()

    def _read_sent(self) -> int:
        try:
            return int(self._sent_file.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            raise DefectLensError(f"{self._sent_file}: not an outbox cursor (a number); refusing to guess what was delivered") from None

    def _load(self) -> int:
        """Queue what was never acknowledged; a last line cut off by a crash was never promised, so it is dropped."""
        last = self.sent
        if not self._messages.exists():
            return last
        keep = 0
        with open(self._messages, "r+b") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                keep += len(line)
                message = json.loads(line)
                last = max(last, message["message_id"])
                if message["message_id"] > self.sent:
                    self._pending.append(message)
            fh.truncate(keep)
        if not self._pending and keep:  # everything delivered: start a fresh file, numbering on
            self._messages.write_text("")
        return last

    # -- the producer side ------------------------------------------------------------------
    def put(self, topic: str, payload: dict[str, Any]) -> int:
        """Append one message durably and queue it; returns its message id."""
        with self._cond:
            message = {"message_id": self.next_id, "topic": topic, "payload": finite(payload)}
            self._fh.write(json.dumps(message) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self.next_id += 1
            self._pending.append(message)
            self._cond.notify_all()
        return message["message_id"]

    @property
    def backlog(self) -> int:
        with self._cond:
            return len(self._pending)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every message so far is acknowledged; False if the receiver stayed away."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop after trying to deliver for ``timeout`` seconds; what is left goes out on the next start."""
        self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout + 15)
        self._fh.close()

    # -- the sender thread ------------------------------------------------------------------
    def _deliver(self) -> None:
        attempt = 0
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                message = self._pending[0]
            try:
                self._send(message)
            except Exception as exc:  # any failure is retried: the sender thread must never die
                self.failures += 1
                self.last_error = str(exc)
                if attempt == 0:
                    log.warning("%s: delivery failed, retrying (messages wait on disk): %s", self.name,
                                exc if isinstance(exc, (DeliveryError, OSError)) else f"{type(exc).__name__}: {exc}")
                wait = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                attempt += 1
                with self._cond:
                    self._cond.wait_for(lambda: self._stop, timeout=wait)
                continue
            attempt = 0
            self._acknowledge(message["message_id"])

    def _acknowledge(self, message_id: int) -> None:
        tmp = self._sent_file.with_name(".sent.tmp")
        tmp.write_text(str(message_id))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(self._sent_file)
        with self._cond:
            self.sent = message_id
            self._pending.popleft()
            if not self._pending:  # all delivered: the file starts over (the cursor keeps the numbering)
                self._fh.truncate(0)
                self._fh.seek(0)
            self._cond.notify_all()


__all__ = ["BACKOFF_S", "DeliveryError", "Outbox"]
