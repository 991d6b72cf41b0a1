"""Where a batch of inspections goes: JSON lines, a CSV summary, Parquet, overlays, maps, statistics.

Files are written as results arrive, so a run over a huge folder keeps memory flat and a
crash keeps everything inspected up to it. Overlays are drawn in worker threads from the small
copy the inspection's own read kept (no file is opened twice); a record is written once its
overlay is on disk, in input order. Running again into the same folder resumes: images
already in results.jsonl are skipped, and a line cut off by the crash is dropped and redone.
Statistics keep only score lists per group.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections import defaultdict, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import numpy as np

from defectlens.batch.parquet import FOLDER as PARQUET_FOLDER
from defectlens.batch.parquet import ParquetParts
from defectlens.data.images import PREVIEW_SIDE, load_rgb, preview
from defectlens.errors import DefectLensError, ImageError
from defectlens.inference.inspection import Inspection
from defectlens.inference.overlay import OVERLAY_SUFFIX, save_overlay
from defectlens.inference.record import BATCH_FIELDS, FIELDS
from defectlens.jsonutil import finite
from defectlens.machine import usable_cores

# summary.csv: the record's summary fields, what its regions and timings come to, and the error
STAGES = ("decode", "backbone", "search", "postprocess", "graph", "decide")  # graph: a whole ONNX scoring graph (backbone to map)
CSV_COLUMNS = [*(f.name for f in FIELDS if f.summary), "regions", "max_region_area_px", "max_region_area_pct", "main_type", "total_ms",
               *(f"{k}_ms" for k in STAGES), *(f.name for f in BATCH_FIELDS if f.summary)]


def score_stats(scores: list[float]) -> dict:
    a = np.asarray(scores, dtype=np.float64)
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "max": float(a.max()),
            "p90": float(np.percentile(a, 90))}


def base_record(path: Path, result: Inspection | ImageError) -> dict:
    """The JSON record of one image: its inspection, or the reason it could not be read."""
    if isinstance(result, ImageError):
        return {"source": str(path), "error": str(result)}
    return result.to_record()


def csv_row(record: dict) -> dict:
    """The summary.csv row of one JSON record (so a resumed run can rebuild the CSV from results.jsonl)."""
    if "error" in record:
        return {"source": record["source"], "verdict": "error", "error": record["error"]}
    biggest = max(record["regions"], key=lambda r: r["area_px"], default=None)
    t = record["timings_ms"]
    return {
        "source": record["source"], "verdict": record["verdict"], "score": f"{record['score']:.6f}",
        "normalised_score": _optional(record["normalised_score"]), "confidence": _optional(record["confidence"]),
        "severity": f"{record['severity']:.4f}", "regions": len(record["regions"]),
        "max_region_area_px": biggest["area_px"] if biggest else 0, "max_region_area_pct": f"{biggest['area_pct']:.4f}" if biggest else "0",
        "main_type": (biggest["type"] or "") if biggest else "", "total_ms": f"{sum(t.values()):.2f}",
        **{f"{k}_ms": f"{t[k]:.2f}" for k in STAGES if k in t}, "error": "",
    }


def _optional(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


RUN_FILE = "run.json"
OVERLAY_MODES = ("all", "rejected", "none")


def overlay_mode(overlays: bool | str) -> str:
    """True and False (the older call) are all and none."""
    mode = {True: "all", False: "none"}.get(overlays, overlays) if isinstance(overlays, bool) else overlays
    if mode not in OVERLAY_MODES:
        raise DefectLensError(f"overlays must be one of {', '.join(OVERLAY_MODES)}, got {overlays!r}")
    return mode


def wants_overlay(mode: str, result: Inspection) -> bool:
    """Whether this image gets an overlay: "rejected" draws for every image not judged good, so an
    uncalibrated model, which judges none, still shows its maps."""
    return mode == "all" or (mode == "rejected" and result.verdict != "good")

# One overlay takes about 5 ms of CPU, so one thread keeps up with 200 images/s; beside scoring on
# two cores a second thread only took turns with the backbone (benchmark --end-to-end: overlay row
# 78-83 % of scoring with one, 72-83 % with two). More cores, more threads.
OVERLAY_THREADS = max(1, usable_cores() // 4)  # the cores this process may use, not the host's
IN_FLIGHT = 16  # overlays being drawn before the writer waits for the oldest


class BatchWriter:
    """results.jsonl + summary.csv (+ overlays/, maps/) as results come, stats.json at the end.

    ``model_checksum`` ties the folder to one model: resuming with another model is refused, so
    one results file never mixes two models' verdicts. ``fresh`` starts the folder over.
    """

    def __init__(self, out: Path, overlays: bool | str = "all", save_maps: bool = False, pixel_threshold: float | None = None,
                 model_checksum: str = "", fresh: bool = False, parquet: bool = False) -> None:
        self.out = Path(out)
        self.overlays = overlay_mode(overlays)
        self.save_maps = save_maps
        self.pixel_threshold = pixel_threshold
        self.model_checksum = model_checksum
        self.fresh = fresh
        self.parquet = parquet
        self._parts: ParquetParts | None = None
        self.done: set[str] = set()  # sources (or the keys callers gave) already in results.jsonl
        self._used: set[str] = set()
        self._groups: dict[str, dict[str, list[float]]] = {"verdict": defaultdict(list), "type": defaultdict(list), "folder": defaultdict(list)}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future | None, dict]] = deque()  # records waiting for their overlay, in input order

    def __enter__(self) -> BatchWriter:
        self.out.mkdir(parents=True, exist_ok=True)
        results, run = self.out / "results.jsonl", self.out / RUN_FILE
        resuming = not self.fresh and results.exists()
        if resuming:
            earlier = json.loads(run.read_text()).get("model_checksum", "") if run.exists() else ""
            if earlier and self.model_checksum and earlier != self.model_checksum:
                raise DefectLensError(f"{self.out}: holds results of another model (checksum {earlier[:12]}); "
                                      "choose another --out, or --fresh to start it over")
        if self.parquet:  # before anything is written, so a refusal here leaves the folder as it was
            self._parts = ParquetParts(self.out / PARQUET_FOLDER, fresh=not resuming)
        run.write_text(json.dumps({"model_checksum": self.model_checksum}))
        self._csv_file = open(self.out / "summary.csv", "w", newline="")  # noqa: SIM115 -- closed in __exit__
        self._csv = csv.DictWriter(self._csv_file, CSV_COLUMNS)
        self._csv.writeheader()
        if resuming:
            self._replay(results)
        self._jsonl = open(results, "a" if resuming else "w")  # noqa: SIM115
        if self.overlays != "none":
            self._pool = ThreadPoolExecutor(OVERLAY_THREADS, thread_name_prefix="overlay")
        return self

    def _replay(self, results: Path) -> None:
        """One streaming pass over what an earlier run wrote: note what is done, count it, and
        rebuild the CSV from it (whatever an interrupted run left there); a last line the crash
        left unfinished is cut off, so its image is redone."""
        parts, consistent, n = self._parts, True, 0
        with open(results, "r+b") as fh:
            keep = 0
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                keep += len(line)
                record = json.loads(line)
                n += 1
                if parts is not None:
                    consistent = consistent and parts.follows(n, record)
                    if n > parts.covered:
                        parts.add(record)
                self.done.add(record.get("key", record["source"]))
                if "overlay" in record or "map" in record:
                    self._used.add(Path(record.get("overlay") or record["map"]).stem)
                if "error" not in record:
                    self._tally(Path(record["source"]), record)
                self._csv.writerow(csv_row(record))
            fh.truncate(keep)
        if parts is not None and (not consistent or n < parts.covered):
            print(f"{self.out / PARQUET_FOLDER}: does not match results.jsonl; rewriting it from there", file=sys.stderr)
            parts.restart()
            with open(results, "rb") as fh:
                for line in fh:
                    parts.add(json.loads(line))

    def _tally(self, path: Path, record: dict) -> None:
        self._groups["verdict"][record["verdict"]].append(record["score"])
        self._groups["folder"][path.parent.name].append(record["score"])
        main = max(record["regions"], key=lambda r: r["area_px"], default=None)
        self._groups["type"][(main["type"] or "(untyped)") if main else "(no region)"].append(record["score"])

    def _name(self, path: Path) -> str:
        name = f"{path.parent.name}_{path.stem}"  # test/<type>/000.png -> <type>_000: unique within MVTec folders
        base, n = name, 1
        while name in self._used:
            n += 1
            name = f"{base}-{n}"
        self._used.add(name)
        return name

    def write(self, path: Path, result: Inspection | ImageError, key: str | None = None) -> dict:
        """``key``: what makes this part itself when a name comes back (a camera reusing file names);
        by default the source."""
        record = base_record(path, result)
        if key is not None:
            record["key"] = key
        if (key or record["source"]) in self.done:  # a result that arrived twice (a retried chunk) is kept once
            return record
        self.done.add(key or record["source"])
        drawing = None
        if not isinstance(result, ImageError):
            overlay = wants_overlay(self.overlays, result)
            name = self._name(path) if (overlay or self.save_maps) else ""
            if overlay:
                target = self.out / "overlays" / f"{name}{OVERLAY_SUFFIX}"
                record["overlay"] = str(target)
                picture = result.preview if result.preview is not None else preview(load_rgb(path))  # e.g. from an engine that kept none
                drawing = self._pool.submit(save_overlay, target, picture, result, self.pixel_threshold)
            if self.save_maps:
                (self.out / "maps").mkdir(exist_ok=True)
                map_path = self.out / "maps" / f"{name}.npy"
                np.save(map_path, result.anomaly_map.astype(np.float16))  # 3 significant digits: ample for a heat map
                record["map"] = str(map_path)
            self._tally(path, record)
        self._pending.append((drawing, record))
        self._flush(wait=len(self._pending) > IN_FLIGHT)
        return record

    def _flush(self, wait: bool = False) -> None:
        """Write the records whose overlays are done, oldest first; with ``wait``, wait for the oldest."""
        while self._pending and (wait or self._pending[0][0] is None or self._pending[0][0].done()):
            drawing, record = self._pending.popleft()
            if drawing is not None:
                drawing.result()  # a failure to write the overlay stops the run here, before its record
            self._jsonl.write(json.dumps(finite(record)) + "\n")
            self._jsonl.flush()
            self._csv.writerow(csv_row(record))
            if self._parts is not None:
                self._parts.add(record)
            wait = len(self._pending) > IN_FLIGHT

    def sync(self) -> None:
        """Write every pending record now (waiting for its overlay): a caller that acts on a part
        only once its record is on disk, such as moving the file away, calls this first."""
        while self._pending:
            self._flush(wait=True)

    def stats(self) -> dict:
        return {f"by_{key}": {g: score_stats(v) for g, v in sorted(groups.items())} for key, groups in self._groups.items()}

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.sync()
        finally:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
            self._jsonl.close()
        self._csv_file.close()
        if self._parts is not None:
            self._parts.flush()
        (self.out / "stats.json").write_text(json.dumps(finite(self.stats()), indent=2))


def run_batch(inspector, paths: Sequence[Path], out: Path | None, overlays: bool | str, save_maps: bool = False,
              engine: str = "local", address: str | None = None, workers: int = 0, fresh: bool = False,
              model_path: Path | None = None, db: str | None = None, parquet: bool = False) -> tuple[int, int, int, int]:
    """Inspect and write: records to ``out`` (resumed if it holds some), else JSON lines to stdout;
    with ``db``, also one history row per image, keyed by model and file so a re-run adds none twice.
    Returns counts of good, defect and unreadable images, and how many were inspected this run."""
    from defectlens.batch.engines import inspect_stream

    counts = {"good": 0, "defect": 0, "uncalibrated": 0, "error": 0}
    pixel_threshold = inspector.calibration.pixel_threshold if inspector.calibration else None
    with contextlib.ExitStack() as stack:
        store = None
        if db is not None:
            from defectlens.history.store import HistoryStore

            store = HistoryStore(db).upgrade()
            stack.callback(store.close)
        writer = None
        if out is not None:
            writer = stack.enter_context(BatchWriter(out, overlays, save_maps, pixel_threshold, inspector.bundle.checksum, fresh, parquet))
            remaining = [p for p in paths if str(p) not in writer.done]
            if len(remaining) < len(paths):
                print(f"resuming {out}: {len(paths) - len(remaining)} of {len(paths)} images already inspected", file=sys.stderr)
            paths = remaining
        preview_side = PREVIEW_SIDE if writer is not None and writer.overlays != "none" else 0
        for path, result in inspect_stream(inspector, model_path, paths, engine, address, workers, progress=out is not None, preview_side=preview_side):
            if isinstance(result, ImageError):
                counts["error"] += 1
                print(f"defectlens: skipped: {result}", file=sys.stderr)
            else:
                counts[result.verdict] += 1
                if store is not None:
                    _record_in_history(store, inspector, path, result)
            if writer is not None:
                writer.write(path, result)
            else:
                print(json.dumps(finite(base_record(path, result))))
    return counts["good"], counts["defect"], counts["error"], len(paths)


def _record_in_history(store, inspector, path: Path, result: Inspection) -> None:
    import hashlib

    from defectlens.history.store import inspection_row

    digest = result.digest or hashlib.sha256(Path(path).read_bytes()).hexdigest()  # the scoring read's digest
    key = f"batch-{inspector.bundle.checksum[:16]}-" + hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    store.record(inspection_row(result, inspector.model_name, inspector.bundle.checksum, digest, key))
