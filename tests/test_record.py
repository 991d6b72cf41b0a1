"""One record schema: JSON lines, summary.csv, Parquet and the history table all follow inference.record."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from defectlens.batch.outputs import CSV_COLUMNS, csv_row
from defectlens.batch.parquet import parquet_row, schema
from defectlens.history.schema import inspections
from defectlens.history.store import NOT_STORED, inspection_row
from defectlens.inference.inspection import Inspection, Region
from defectlens.inference.record import BATCH_FIELDS, FIELDS, REGION_FIELDS, json_keys

SQL_TYPES = {"text": sa.String, "real": sa.Float, "integer": sa.Integer, "count": sa.Integer, "regions": sa.JSON, "timings": sa.JSON}


def inspection() -> Inspection:
    amap = np.zeros((48, 64), np.float32)
    region = Region((1, 2, 30, 40), 120, 3.9, 0.8, 1.4, 2.0, 0.7, "scratch/crack-like", "heuristic")
    return Inspection("parts/a.png", 1.5, 1.0, True, amap, amap > 0, [region], {"decode": 1.0, "backbone": 5.0}, "bottle", 0.9, 0.8)


def test_the_json_record_has_the_declared_fields_in_order():
    record = inspection().to_record()
    assert list(record) == json_keys()
    assert record["image_size"] == [64, 48]
    assert {f.name for f in REGION_FIELDS[4:]} | {"box"} == set(record["regions"][0])


def test_parquet_schema_and_rows_come_from_the_table():
    pa = pytest.importorskip("pyarrow")
    s = schema()
    assert s.names == [f.name for f in (*FIELDS, *BATCH_FIELDS)]
    assert [f.name for f in s.field("regions").type.value_type] == [f.name for f in REGION_FIELDS]
    table = pa.Table.from_pylist([parquet_row(inspection().to_record()), parquet_row({"source": "b.png", "error": "truncated"})], schema=s)
    first = table.to_pylist()[0]
    assert (first["width"], first["height"], first["regions"][0]["x1"], first["regions"][0]["area_px"]) == (64, 48, 30, 120)
    assert table.column("verdict").to_pylist() == ["defect", "error"]


def test_the_history_table_holds_every_stored_field_with_its_type():
    columns = {c.name: c for c in inspections.columns}
    for f in FIELDS:
        if f.name == "model":
            assert isinstance(columns["model"].type, sa.String)  # the row's model column, set by the caller
            continue
        if f.name in NOT_STORED:
            assert f.name not in columns
            continue
        assert isinstance(columns[f.name].type, SQL_TYPES[f.kind]), f.name
        assert columns[f.name].nullable == f.nullable, f.name
    row = inspection_row(inspection(), "bottle", "c" * 64, "f" * 64, "r1")
    assert set(row) <= set(columns) and row["width"] == 64 and row["score"] == 1.5


def test_summary_csv_takes_its_scalar_columns_from_the_table():
    summary = [f.name for f in FIELDS if f.summary]
    assert CSV_COLUMNS[: len(summary)] == summary and CSV_COLUMNS[-1] == "error"
    assert set(csv_row(inspection().to_record())) <= set(CSV_COLUMNS)
