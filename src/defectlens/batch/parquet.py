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
from defectlens.inference.record import BATCH_FIELDS, FIELDS, REGION_FIELDS, flat, flat_region

ROWS_PER_PART = 10_000  # ~1 MB parts: few files for a million images, little lost work per crash
FOLDER = "results.parquet"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DefectLensError("--parquet needs pyarrow: pip install 'defectlens[parquet]'") from None
    return pa, pq


def _arrow_type(pa, kind: str):
    if kind == "regions":
        return pa.list_(pa.struct([(f.name, _arrow_type(pa, f.kind)) for f in REGION_FIELDS]))
    kinds = {"text": pa.string(), "real": pa.float64(), "integer": pa.int32(), "count": pa.int64(), "timings": pa.map_(pa.string(), pa.float64())}
    return kinds[kind]


def schema():
    """The Parquet schema: the record's fields (inference.record) and the batch fields, in order."""
    pa, _ = _pyarrow()
    return pa.schema([pa.field(f.name, _arrow_type(pa, f.kind), nullable=True) for f in (*FIELDS, *BATCH_FIELDS)])


def parquet_row(record: dict) -> dict:
    """One results.jsonl record as a flat, typed row: an unreadable image keeps its source and
    error with the rest null, so one table holds every image."""
    if "error" in record:
        return {"source": record["source"], "verdict": "error", "error": record["error"]}
    row = flat(record)
    row["regions"] = [flat_region(r) for r in record["regions"]]
    row["timings_ms"] = list(record["timings_ms"].items())
    return {f.name: row.get(f.name) for f in (*FIELDS, *BATCH_FIELDS)}


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
