"""History through a database outage: rows wait in a local journal and are written when it returns.

The line does not stop because the database server restarted. When an inspection row cannot be
written, it is appended (fsynced) to a journal file instead, and so is every row after it until
the journal is empty again, so the database receives rows in the order they were made. A
background thread retries; when the database answers, it writes the journal's rows in order and
then empties the journal. Rows are keyed by request id, so a replay cut short by another outage,
or by a kill, writes none of them twice: every answered request ends with exactly one row.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from defectlens.history.store import HistoryStore, StoreError, StoreUnavailable, as_utc, utcnow

log = logging.getLogger("defectlens.history")
RETRY_S = 2.0


class JournaledStore:
    """``record`` and ``by_request_id`` of a HistoryStore that outlive the database being away."""

    def __init__(self, store: HistoryStore, folder: Path) -> None:
        self.store = store
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # One file per running process (several services or watchers may share a database and a
        # folder); a file whose process is gone is adopted, so rows from before a kill still go out.
        self.path = self.folder / f"pending-{_process_tag(os.getpid())}-{uuid.uuid4().hex[:8]}.jsonl"
        self._lock = threading.RLock()
        self._waiting: dict[str, dict[str, Any]] = {}  # request id -> row, in journal order
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- closed in close()
        self._adopt()
        self._stop = threading.Event()
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._drain_loop, name="history-journal", daemon=True)
        self._thread.start()

    def _adopt(self) -> None:
        for orphan in sorted(self.folder.glob("pending-*.jsonl")):
            if orphan == self.path or _alive(orphan):
                continue
            claimed = orphan.with_name(f".adopting-{uuid.uuid4().hex}")
            try:
                orphan.rename(claimed)  # atomic: of two processes starting together, one gets it
            except FileNotFoundError:
                continue
            with open(claimed, "rb") as fh:
                for line in fh:
                    if line.endswith(b"\n"):  # a last line cut off by a kill was never answered
                        self._append(json.loads(line))
            claimed.unlink()
        if self._waiting:
            log.warning("history journal %s: %d rows from before a restart wait for the database", self.path, len(self._waiting))

    @property
    def degraded(self) -> bool:
        return bool(self._waiting)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def state(self) -> dict[str, Any]:
        return {"state": "degraded" if self._waiting else "ok", "journaled": len(self._waiting), "journal": str(self.path),
                "last_error": self.last_error if self._waiting else None}

    def record(self, row: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """As HistoryStore.record; while the database is away the row is journaled (its ``id`` is None)."""
        row = {**row, "created_at": row.get("created_at") or utcnow()}
        with self._lock:
            if row["request_id"] in self._waiting:
                return {**self._waiting[row["request_id"]], "id": None, "journaled": True}, False
            if not self._waiting:
                try:
                    return self.store.record(row)
                except StoreUnavailable as exc:
                    self.last_error = str(exc)
                    log.warning("history database unreachable; journaling rows in %s: %s", self.path, exc)
            self._append(row)
            return {**_jsonable(row), "id": None, "journaled": True}, True

    def by_request_id(self, request_id: str) -> dict[str, Any] | None:
        """The row of an earlier request with this id. While the database is away, only journaled
        rows are known: a retry of a request answered before the outage is answered again, and its
        second row meets the first one's key when the journal is written, so it is never stored twice."""
        with self._lock:
            if request_id in self._waiting:
                return {**self._waiting[request_id], "id": None, "journaled": True}
        try:
            return self.store.by_request_id(request_id)
        except StoreUnavailable:
            return None

    def _append(self, row: dict[str, Any]) -> None:
        data = _jsonable(row)
        if data["request_id"] in self._waiting:
            return
        self._fh.write(json.dumps(data) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._waiting[row["request_id"]] = data

    # -- drain ------------------------------------------------------------------------------
    def drain(self, chunk: int = 200) -> int:
        """Write what waits, in order, if the database answers; returns the rows still waiting.
        The lock is let go between chunks, so inspections go on while a long backlog is written."""
        while True:
            with self._lock:
                if not self._waiting:
                    return 0
                for request_id, data in list(self._waiting.items())[:chunk]:
                    try:
                        self.store.record({**data, "created_at": as_utc(datetime.fromisoformat(data["created_at"]))})
                    except StoreUnavailable as exc:
                        self.last_error = str(exc)
                        return len(self._waiting)
                    except StoreError as exc:  # the database is there but refuses this row: kept aside, the rest goes on
                        self._set_aside(data, exc)
                    del self._waiting[request_id]
                if not self._waiting:  # written: the journal starts empty again (a kill before this only replays rows the keys dedupe)
                    self._fh.truncate(0)
                    self._fh.seek(0)
                    os.fsync(self._fh.fileno())
                    log.warning("history database back: journal %s written to it", self.path)
                    return 0

    def _set_aside(self, data: dict[str, Any], exc: Exception) -> None:
        log.error("history journal: row %s refused by the database, kept in %s: %s", data["request_id"], self.folder / "refused.jsonl", exc)
        with open(self.folder / "refused.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**data, "refused": str(exc)}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _drain_loop(self) -> None:
        while not self._stop.wait(RETRY_S):
            if self._waiting:
                try:
                    self.drain()
                except Exception:  # the thread must outlive any one failure, or the history stops quietly
                    log.exception("history journal: draining failed; retrying in %s s", RETRY_S)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.drain()
        self._fh.close()
        if not self._waiting:
            self.path.unlink(missing_ok=True)


def _process_tag(pid: int) -> str:
    """pid and start time: a pid alone is reused (a restarted container runs its service as the same pid)."""
    try:
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "0"
    return f"{pid}.{started}"


def _alive(path: Path) -> bool:
    """Whether the process that wrote a journal file still runs (its tag is in the name)."""
    try:
        tag = path.name.split("-")[1]
        pid = int(tag.split(".")[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return _process_tag(pid) == tag


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


__all__ = ["JournaledStore"]
