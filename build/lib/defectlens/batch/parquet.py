"""Batch results as a Parquet data set: one folder of part files that pandas, DuckDB, Spark or
pyarrow read as one table.

results.jsonl stays the journal a resumed run trusts; Parquet follows it. Records are buffered
and written as a part file every ``ROWS_PER_PART`` rows (a part is written under a hidden
temporary name and renamed, so a reader or a crash never meets half a part). Because parts hold
the journal's records in order, the rows in the parts are a prefix of the journal: a resumed run
counts them and writes the rest, so a crash loses and duplicates no row.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from defectlens.errors import DefectLensError

ROWS_PER_PART = 10_000  # ~1 MB parts: few files for a million images, little lost work per crash
FOLDER = "results.parquet"

_FLOAT_FIELDS = ("score", "normalised_score", "confidence", "threshold", "severity")
_REGION_FIELDS = ("area_pct", "mean_score", "max_score", "elongation", "severity", "type", "type_source", "type_confidence")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DefectLensError("--parquet needs pyarrow: pip install 'defectlens[parquet]'") from None
    return pa, pq


def schema():
    pa, _ = _pyarrow()
    region = pa.struct([("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()), ("y1", pa.int32()), ("area_px", pa.int64()),
                        ("area_pct", pa.float64()), ("mean_score", pa.float64()), ("max_score", pa.float64()),
                        ("elongation", pa.float64()), ("severity", pa.float64()), ("type", pa.string()),
                        ("type_source", pa.string()), ("type_confidence", pa.float64())])
    return pa.schema([("source", pa.string()), ("verdict", pa.string()), *((f, pa.float64()) for f in _FLOAT_FIELDS),
                      ("width", pa.int32()), ("height", pa.int32()), ("regions", pa.list_(region)),
                      ("timings_ms", pa.map_(pa.string(), pa.float64())), ("model", pa.string()),
                      ("overlay", pa.string()), ("map", pa.string()), ("error", pa.string())])


def parquet_row(record: dict) -> dict:
    """One results.jsonl record as a flat, typed row: an unreadable image keeps its source and
    error with the rest null, so one table holds every image."""
    if "error" in record:
        return {"source": record["source"], "verdict": "error", "error": record["error"]}
    width, height = record["image_size"]
    regions = [{"x0": r["box"][0], "y0": r["box"][1], "x1": r["box"][2], "y1": r["box"][3], "area_px": r["area_px"],
                **{k: r[k] for k in _REGION_FIELDS}} for r in record["regions"]]
    return {"source": record["source"], "verdict": record["verdict"], **{f: record[f] for f in _FLOAT_FIELDS},
            "width": width, "height": height, "regions": regions, "timings_ms": list(record["timings_ms"].items()),
            "model": record["model"], "overlay": record.get("overlay"), "map": record.get("map")}


class ParquetParts:
    """Buffers rows and writes numbered part files under ``folder``."""

    def __init__(self, folder: Path, fresh: bool) -> None:
        pa, pq = _pyarrow()
        self.folder = Path(folder)
        self._schema = schema()
        if self.folder.exists() and not self.folder.is_dir():
            raise DefectLensError(f"{self.folder}: is a file; Parquet results go in a folder of that name (move the file away)")
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".part-*"):  # a part a crash left half-written
            stale.unlink()
        self._rows: list[dict] = []
        self.covered, self._last_source = 0, None
        if fresh:
            self.restart()
            return
        try:
            self.covered = sum(pq.read_metadata(p).num_rows for p in self._parts())
            if self.covered:
                self._last_source = pq.read_table(self._parts()[-1], columns=["source"])["source"][-1].as_py()
        except (OSError, pa.ArrowException) as exc:  # damaged by hand or by the disk: the journal still has every record
            print(f"{self.folder}: a part is unreadable ({exc}); rewriting the parts from results.jsonl", file=sys.stderr)
            self.restart()

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def follows(self, records_seen: int, record: dict) -> bool:
        """Whether the ``records_seen``-th journal record (1-based) is the last row already in
        the parts; checked once, on the last covered record, so a journal that no longer
        matches the parts (edited, or another run's) makes the parts be rewritten."""
        return records_seen != self.covered or record["source"] == self._last_source

    def restart(self) -> None:
        for part in self._parts():
            part.unlink()
        self.covered = 0
        self._rows = []

    def add(self, record: dict) -> None:
        self._rows.append(parquet_row(record))
        if len(self._rows) >= ROWS_PER_PART:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        pa, pq = _pyarrow()
        index = len(self._parts())
        final, tmp = self.folder / f"part-{index:05d}.parquet", self.folder / f".part-{index:05d}.parquet.tmp"
        pq.write_table(pa.Table.from_pylist(self._rows, schema=self._schema), tmp, compression="zstd")
        os.replace(tmp, final)
        self.covered += len(self._rows)
        self._rows = []
