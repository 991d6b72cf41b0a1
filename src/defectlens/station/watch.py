"""`defectlens watch`: inspect what a camera delivers, as it arrives, each part exactly once.

A source is a hot folder (a camera or PLC drops image files into it) or a video stream (a file,
an RTSP URL, a camera device) sampled at a frame rate. For every part, in this order:

1. it is inspected: a file only once it is completely written (the close-write event, or its size
   and modification time unchanged for ``settle_s``); one that cannot be read but was modified
   less than ``grace_s`` ago is taken back and tried again once it settles again, since a writer
   that pauses longer than ``settle_s`` leaves a file that looks complete and is not;
2. its history row is written (``--db``; keyed by model and file, so doing it again adds none; while
   the database is away the row waits in a local journal and is written when it returns);
3. its verdict is put in the outbox of every ``--publish`` destination (on disk before it leaves);
4. its record is appended to ``results.jsonl`` in ``--out``: the journal of what is done;
5. the file is moved to ``--done``, or an unreadable one to ``errors/`` with a one-line reason.

A watcher killed at any point and started again redoes only the part it was working on: parts in
the journal are skipped (a file still in the folder is just moved on), and the steps before the
journal are idempotent (the history row by key, the published message by its ``record_id``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectlens.batch.outputs import BatchWriter, overlay_mode
from defectlens.data.images import IMAGE_SUFFIXES, PREVIEW_SIDE
from defectlens.errors import DefectLensError, ImageError
from defectlens.history.journal import JournaledStore
from defectlens.history.store import HistoryStore, inspection_row
from defectlens.inference.inspection import Inspection
from defectlens.inference.inspector import Inspector
from defectlens.publish import Publisher

log = logging.getLogger("defectlens.watch")
TEMPORARY = (".tmp", ".part", ".partial", ".crdownload", ".filepart")  # names writers use before they rename
GRACE_S = 10.0  # an unreadable file changed less than this long ago is tried again, not set aside
BATCH = 8


@dataclass
class WatchCounts:
    inspected: int = 0
    good: int = 0
    defect: int = 0
    errors: int = 0
    skipped: int = 0  # already in the journal
    retried: int = 0  # unreadable a moment after a change: given back to the folder to finish


def record_key(checksum: str, part: str) -> str:
    """The one id of a part's verdict, the same however often it is redone: history rows and
    published messages carry it, so neither the database nor a consumer ever counts a part twice."""
    return f"watch-{checksum[:16]}-" + hashlib.sha256(part.encode()).hexdigest()[:32]


def file_part(path: Path) -> str | None:
    """A file's identity as a part: its path, size and modification time, so a camera that reuses
    names (part.png again, a counter reset after a reboot) brings a new part, not a done one."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


# -- sources -----------------------------------------------------------------------------------

class FolderSource:
    """Files arriving in a folder, handed out once each is complete; oldest first."""

    def __init__(self, folder: Path, settle_s: float = 0.5, ignore: tuple[Path, ...] = ()) -> None:
        if not folder.is_dir():
            raise DefectLensError(f"{folder}: not a folder to watch")
        self.folder = folder.resolve()
        self.settle_s = settle_s
        self.ignore = tuple(p.resolve() for p in ignore)
        self._seen: dict[Path, tuple[tuple[int, int], float]] = {}  # path -> ((size, mtime), unchanged since)
        self._handed: set[Path] = set()
        self._closed: set[Path] = set()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._observer = None

    def start(self) -> None:
        from watchdog.events import FileClosedEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        source = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if isinstance(event, FileClosedEvent):
                    with source._lock:
                        source._closed.add(Path(os.fsdecode(event.src_path)).resolve())
                source._wake.set()

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.folder), recursive=True)
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)

    def _wanted(self, path: Path) -> bool:
        name = path.name
        if name.startswith(".") or name.lower().endswith(TEMPORARY) or path.suffix.lower() not in IMAGE_SUFFIXES:
            return False
        return not any(path.is_relative_to(i) for i in self.ignore)

    def _scan(self) -> list[Path]:
        found = []
        for root, dirs, files in os.walk(self.folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not any((Path(root) / d).resolve() == i for i in self.ignore))
            found += [Path(root) / f for f in files]
        return [p for p in found if self._wanted(p)]

    def again(self, paths: list[Path]) -> None:
        """Hand these out once more when they next settle (or are closed after writing). Called
        from the thread that calls ``ready``: only the close events need the lock."""
        self._handed.difference_update(p.resolve() for p in paths)

    def ready(self, timeout: float) -> list[Path]:
        """Complete files not handed out before, oldest first, waiting up to ``timeout`` for news
        (less while some file is still being written, so it is picked up once it settles)."""
        self._wake.wait(min(timeout, max(0.05, self.settle_s / 2)) if self._seen else timeout)
        self._wake.clear()
        now = time.monotonic()
        with self._lock:
            closed, self._closed = self._closed, set()
        out, present = [], set()
        for path in self._scan():
            key = path.resolve()
            present.add(key)
            if key in self._handed:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            signature = (st.st_size, st.st_mtime_ns)
            earlier = self._seen.get(key)
            since = now if earlier is None or earlier[0] != signature else earlier[1]
            self._seen[key] = (signature, since)
            if st.st_size > 0 and (key in closed or now - since >= self.settle_s):
                out.append((st.st_mtime_ns, path))
                self._handed.add(key)
                del self._seen[key]
        self._handed &= present  # moved away: forgotten, so memory stays flat on a line that runs for months
        self._seen = {k: v for k, v in self._seen.items() if k in present}
        return [p for _, p in sorted(out)]


class VideoSource:
    """Frames of a video file, an RTSP/HTTP stream or a camera device (``0``, ``/dev/video0``), at ``fps``
    (0: every frame). Frames are named ``<source>#frame=<n>``, so a video file resumes where it stopped."""

    def __init__(self, url: str, fps: float = 0.0) -> None:
        import cv2

        self.url = url
        device = int(url) if url.isdigit() else url
        self.capture = cv2.VideoCapture(device)
        if not self.capture.isOpened():
            raise DefectLensError(f"{url}: cannot open as a video file, stream or camera")
        self.native_fps = self.capture.get(cv2.CAP_PROP_FPS) or 0.0
        self.fps = fps
        self.live = not Path(url).is_file()

    def frames(self) -> Iterator[tuple[str, np.ndarray]]:
        import cv2

        n, last_kept = -1, None
        step = 1.0 / self.fps if self.fps > 0 else 0.0
        while True:
            ok, frame = self.capture.read()
            if not ok:
                return
            n += 1
            t = time.monotonic() if self.live else (n / self.native_fps if self.native_fps > 0 else n * max(step, 0))
            if step and last_kept is not None and t - last_kept < step - 1e-9:
                continue
            last_kept = t
            yield f"{self.url}#frame={n:08d}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0

    def stop(self) -> None:
        self.capture.release()


def is_video_source(source: str) -> bool:
    return source.isdigit() or "://" in source or source.startswith("/dev/video") or (
        Path(source).is_file() and Path(source).suffix.lower() in (".mp4", ".avi", ".mkv", ".mov", ".mjpeg", ".mjpg", ".webm"))


# -- the watcher -------------------------------------------------------------------------------

class Watcher:
    def __init__(self, model: Path, source: str, out: Path, db: str | None = None, publish: list[str] | None = None,
                 done: Path | None = None, errors: Path | None = None, fps: float = 0.0, settle_s: float = 0.5,
                 overlays: bool | str = "all", runtime: str = "auto", grace_s: float = GRACE_S) -> None:
        if settle_s < 0 or grace_s < 0:
            raise DefectLensError(f"--settle and --grace must not be negative, got {settle_s} / {grace_s}")
        self.model = Path(model)
        self.inspector = Inspector.load(model, runtime=runtime)
        self.source = source
        self.out = Path(out)
        self.db = db
        self.publish_urls = list(publish or [])
        self.done = Path(done) if done else None
        self.errors = Path(errors) if errors else self.out / "errors"
        self.fps = fps
        self.settle_s = settle_s
        self.grace_s = grace_s
        self.overlays = overlay_mode(overlays)
        self.counts = WatchCounts()

    def run(self, stop: threading.Event | None = None, until: Callable[[WatchCounts], bool] | None = None) -> WatchCounts:
        """Watch until ``stop`` is set (or SIGINT), or ``until(counts)`` is true, or a video file ends."""
        stop = stop or threading.Event()
        checksum = self.inspector.bundle.checksum
        pixel_threshold = self.inspector.calibration.pixel_threshold if self.inspector.calibration else None
        with contextlib.ExitStack() as stack:
            writer = stack.enter_context(BatchWriter(self.out, self.overlays, False, pixel_threshold, checksum))
            store = None
            if self.db:  # rows wait in a journal under --out while the database is away
                database = HistoryStore(self.db).upgrade()
                stack.callback(database.close)
                store = JournaledStore(database, self.out / "history-journal")
                stack.callback(store.close)
            publisher = None
            if self.publish_urls:
                publisher = Publisher(self.publish_urls, self.out / "outbox")
                stack.callback(publisher.close)
            steps = _Steps(self, writer, store, publisher, checksum)
            if is_video_source(self.source):
                video = VideoSource(self.source, self.fps)
                stack.callback(video.stop)
                # a file's frames are the same parts on a restart (it resumes); a live stream's are new ones
                session = f"@{time.time_ns()}" if video.live else ""
                chunk: list[tuple[str, str, np.ndarray]] = []
                for name, frame in video.frames():
                    if stop.is_set() or (until and until(self.counts)):
                        break
                    if name + session in writer.done:
                        self.counts.skipped += 1
                        continue
                    chunk.append((name, name + session, frame))
                    if len(chunk) >= BATCH:
                        steps.frames(chunk)
                        chunk = []
                if chunk:
                    steps.frames(chunk)
                return self.counts
            folder = FolderSource(Path(self.source), self.settle_s, ignore=tuple(p for p in (self.out, self.done, self.errors) if p))
            folder.start()
            stack.callback(folder.stop)
            while not stop.is_set() and not (until and until(self.counts)):
                ready = folder.ready(timeout=0.5)
                for start in range(0, len(ready), BATCH):
                    folder.again(steps.files(ready[start : start + BATCH]))
                    if stop.is_set():
                        break
        return self.counts


class _Steps:
    """The five steps of the module docstring, for a chunk of files or frames."""

    def __init__(self, watcher: Watcher, writer: BatchWriter, store: JournaledStore | None, publisher: Publisher | None, checksum: str) -> None:
        self.w = watcher
        self.writer = writer
        self.store = store
        self.publisher = publisher
        self.checksum = checksum

    def files(self, paths: list[Path]) -> list[Path]:
        """Inspect, record and move on these files; returns those to be tried again (unreadable,
        and changed less than ``grace_s`` ago: perhaps still being written)."""
        todo, parts = [], []
        for path in paths:
            part = file_part(path)
            if part is None:
                continue  # taken away before its turn
            if part in self.writer.done:  # journalled before a kill, not yet moved on
                self.w.counts.skipped += 1
                self._move_done(path)
            else:
                todo.append(path)
                parts.append(part)
        if not todo:
            return []
        preview = PREVIEW_SIDE if self.w.overlays != "none" else 0
        results = list(self.w.inspector.inspect_many(todo, preview_side=preview))
        again, kept = [], []
        for path, part, result in zip(todo, parts, results, strict=True):
            if isinstance(result, ImageError) and self._recently_changed(path):
                again.append(path)
            else:
                kept.append((path, part, result))
        self.w.counts.retried += len(again)
        for path, part, result in kept:
            self._one(path, str(path), part, result)
        self.writer.sync()
        for path, _, result in kept:
            if isinstance(result, ImageError):
                self._move_error(path, result)
            else:
                self._move_done(path)
        return again

    def _recently_changed(self, path: Path) -> bool:
        try:
            return time.time() - path.stat().st_mtime < self.w.grace_s
        except FileNotFoundError:
            return False

    def frames(self, frames: list[tuple[str, str, np.ndarray]]) -> None:
        preview = PREVIEW_SIDE if self.w.overlays != "none" else 0
        results = list(self.w.inspector.inspect_many([f for _, _, f in frames], preview_side=preview))
        for (name, part, _), result in zip(frames, results, strict=True):
            if isinstance(result, Inspection):
                result.source = name
            stem = name.rsplit("#frame=", 1)
            self._one(Path(Path(stem[0]).name) / f"frame-{stem[-1]}", name, part, result)
        self.writer.sync()

    def _one(self, path: Path, source: str, part: str, result: Inspection | ImageError) -> None:
        key = record_key(self.checksum, part)
        history_id = None
        if isinstance(result, ImageError):
            self.w.counts.errors += 1
            print(f"defectlens: unreadable: {result}", file=sys.stderr)
        else:
            self.w.counts.inspected += 1
            self.w.counts.good += result.verdict == "good"
            self.w.counts.defect += result.verdict == "defect"
            if self.store is not None:
                digest = result.digest or hashlib.sha256(source.encode()).hexdigest()
                row, _ = self.store.record(inspection_row(result, self.w.inspector.model_name, self.checksum, digest, key, source))
                history_id = row["id"]
            if self.publisher is not None:
                record = result.to_record()
                self.publisher.publish(self.w.inspector.model_name, {
                    "record_id": key, "history_id": history_id, "model": self.w.inspector.model_name, "model_checksum": self.checksum,
                    "source": source, "verdict": record["verdict"], "score": record["score"], "threshold": record["threshold"],
                    "severity": record["severity"], "regions": record["regions"], "inspected_at": time.time()})
        self.writer.write(path, result, key=part)

    def _move_done(self, path: Path) -> None:
        if self.w.done is not None and path.exists():  # FolderSource hands out paths under its resolved folder
            _move(path, self.w.done / path.relative_to(Path(self.w.source).resolve()))

    def _move_error(self, path: Path, error: ImageError) -> None:
        if not path.exists():
            return
        target = _move(path, self.w.errors / path.name)
        target.with_name(target.name + ".reason.txt").write_text(str(error).splitlines()[0] + "\n")


def _move(path: Path, target: Path) -> Path:
    """Move without ever overwriting: a second part of the same name gets a numbered name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    base, n = target, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.stem}-{n}{base.suffix}")
    shutil.move(str(path), str(target))
    return target


__all__ = ["FolderSource", "VideoSource", "WatchCounts", "Watcher", "is_video_source", "record_key"]
