"""Batch inspection engines: resuming a folder, and Ray surviving a killed worker."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from defectlens import Inspector
from defectlens.batch.engines import inspect_stream
from defectlens.cli import main

from .conftest import ray_worker_pids

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("ray")]  # the service, line loop, watcher or engines end to end: not for the fast lane


def sources(out) -> list[str]:
    return [json.loads(line)["source"] for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_rerun_resumes_and_a_cut_off_line_is_redone(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["inspect", str(model_dir / "discs.dlens"), *inputs, "--out", str(out), "--no-overlay"]) == 0
    complete = sources(out)
    assert len(complete) == len(set(complete)) == 29 and any("corrupt" in s for s in complete)
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:20]) + lines[20][:15])  # a crash mid-line
    capsys.readouterr()
    assert main(["inspect", str(model_dir / "discs.dlens"), *inputs, "--out", str(out), "--no-overlay"]) == 0
    assert "20 of 29 images already inspected" in capsys.readouterr().err
    assert sorted(sources(out)) == sorted(complete)
    stats = json.loads((out / "stats.json").read_text())
    assert sum(g["n"] for g in stats["by_verdict"].values()) == 28  # the corrupt file has no score
    assert len((out / "summary.csv").read_text().splitlines()) == 30  # one header


@pytest.mark.slow
def test_resuming_with_another_model_is_refused(model_dir, inputs, tmp_path, tiny_dataset, capsys):
    out = tmp_path / "out"
    assert main(["inspect", str(model_dir / "discs.dlens"), inputs[0], "--out", str(out), "--no-overlay"]) == 0
    other = tmp_path / "other.dlens"
    assert main(["fit", str(tiny_dataset), "-o", str(other), "--image-size", "64", "--coreset-ratio", "0.2", "--detector", "patchcore"]) == 0
    assert main(["inspect", str(other), inputs[0], "--out", str(out)]) == 2
    assert "holds results of another model" in capsys.readouterr().err
    assert main(["inspect", str(other), inputs[0], "--out", str(out), "--fresh", "--no-overlay"]) == 0
    assert len(sources(out)) == 12


@pytest.mark.slow
def test_ray_engine_survives_a_killed_worker(model_dir, inputs):
    pytest.importorskip("ray")
    from defectlens.data.images import flatten_inputs

    paths = flatten_inputs(inputs)
    model = model_dir / "discs.dlens"
    stream = inspect_stream(Inspector.load(model), model, paths, engine="ray", workers=2, chunk=2)
    seen = [next(stream)]
    pids = ray_worker_pids(2)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)  # mid-run: its chunks in flight must be run again elsewhere or after restart
    seen += list(stream)
    assert sorted(str(p) for p, _ in seen) == sorted(str(p) for p in paths)  # every image exactly once
    errors = [r for _, r in seen if isinstance(r, Exception)]
    assert len(errors) == 1 and "corrupt.png" in str(errors[0])


@pytest.mark.slow
def test_ray_engine_through_the_command_line(model_dir, inputs, tmp_path, capsys):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    assert main(["inspect", str(model_dir / "discs.dlens"), *inputs, "--out", str(out), "--engine", "ray", "--workers", "2", "--no-overlay",
                 "--parquet"]) == 0
    assert len(sources(out)) == len(set(sources(out))) == 29
    pq = pytest.importorskip("pyarrow.parquet")
    assert pq.read_table(out / "results.parquet", columns=["source"])["source"].to_pylist() == sources(out)
    assert main(["inspect", str(model_dir / "discs.dlens"), *inputs, "--engine", "ray"]) == 2
    assert "need --out" in capsys.readouterr().err


@pytest.mark.slow
def test_scaling_benchmark_prints_growth_and_engine_throughput(tiny_dataset, tmp_path, capsys):
    pytest.importorskip("ray")
    out = tmp_path / "scaling.json"
    assert main(["benchmark", str(tiny_dataset), "--scaling", "--train-sizes", "4,8,99", "--image-sizes", "64,96", "--coreset-ratio", "0.1",
                 "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    points = figures["points"]
    assert [(p["varied"], p["train_images"], p["image_size"]) for p in points] == [
        ("train images", 4, 256), ("train images", 8, 256), ("train images", 99, 256), ("image size", 16, 64), ("image size", 16, 96)]
    measured = [p for p in points if not p["note"]]
    assert len(measured) == 4 and all(p["fit_s"] > 0 and p["inspect_images_per_s"] > 0 and p["state_mib"] > 0 for p in measured)
    assert points[1]["state_mib"] > points[0]["state_mib"]  # the memory bank grows with the training set
    assert "only 16 training images" in points[2]["note"]
    assert figures["engines"]["local_images_per_s"] > 0 and figures["engines"]["ray_images_per_s"] > 0
    assert "| train images | 4 | 256 |" in capsys.readouterr().out


def test_batch_inspections_go_into_the_history_once(model_dir, inputs, tmp_path):
    from defectlens.history.store import HistoryQuery, HistoryStore

    db = f"sqlite:///{tmp_path / 'history.db'}"
    for extra in ([], ["--fresh"]):  # a full re-run adds no second row for the same model and file
        assert main(["inspect", str(model_dir / "discs.dlens"), *inputs, "--out", str(tmp_path / "out"), "--no-overlay", "--db", db, *extra]) == 0
    store = HistoryStore(db)
    total, rows = store.query(HistoryQuery(model="discs"), limit=100)
    assert total == 28 and len({r["source"] for r in rows}) == 28  # the corrupt file is in results.jsonl, not in the history
    assert all(r["request_id"].startswith("batch-") and len(r["image_sha256"]) == 64 for r in rows)


def test_parquet_follows_the_journal_through_crashes(model_dir, inputs, tmp_path, monkeypatch, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    from defectlens.batch import parquet as parquet_output

    monkeypatch.setattr(parquet_output, "ROWS_PER_PART", 4)
    out = tmp_path / "out"
    args = ["inspect", str(model_dir / "discs.dlens"), *inputs, "--out", str(out), "--no-overlay", "--parquet"]
    folder = out / "results.parquet"

    def table_matches_journal() -> None:
        table = pq.read_table(folder).to_pylist()
        journal = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert [r["source"] for r in table] == [r["source"] for r in journal] and len(table) == 29
        for row, record in zip(table, journal, strict=True):
            if "error" in record:
                assert row["verdict"] == "error" and row["error"] == record["error"] and row["score"] is None
            else:
                assert (row["verdict"], row["score"], len(row["regions"])) == (record["verdict"], record["score"], len(record["regions"]))
                assert dict(row["timings_ms"]) == record["timings_ms"]

    assert main(args) == 0
    assert len(list(folder.glob("part-*.parquet"))) == 8  # 29 rows in parts of 4
    table_matches_journal()

    # killed after the journal got lines 25-26 but before their part was written, and mid-way through line 27
    for part in ("part-00006.parquet", "part-00007.parquet"):
        (folder / part).unlink()
    (folder / ".part-00006.parquet.tmp").write_bytes(b"half a part")
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:26]) + lines[26][:10])
    assert main(args) == 0
    table_matches_journal()
    assert not list(folder.glob(".part-*"))

    # a journal shorter than the parts (cut back by hand): the parts are rewritten from it
    (out / "results.jsonl").write_text("".join(lines[:10]))
    capsys.readouterr()
    assert main(args) == 0
    assert "rewriting it from there" in capsys.readouterr().err
    table_matches_journal()

    # parts from another order of the same images (the journal was replaced), with a last row not in them
    (folder / "part-00007.parquet").unlink()
    (out / "results.jsonl").write_text("".join(reversed((out / "results.jsonl").read_text().splitlines(keepends=True))))
    assert main(args) == 0
    table_matches_journal()

    # a damaged part: the journal still holds every record, so the parts are written again from it
    (folder / "part-00003.parquet").write_bytes(b"PAR1 not really")
    capsys.readouterr()
    assert main(args) == 0
    assert "a part is unreadable" in capsys.readouterr().err
    table_matches_journal()

    assert main(["inspect", str(model_dir / "discs.dlens"), *inputs, "--parquet"]) == 2  # nowhere to put the files
    other = tmp_path / "other"
    (other / "results.parquet").parent.mkdir()
    (other / "results.parquet").write_text("a file in the way")
    assert main(["inspect", str(model_dir / "discs.dlens"), *inputs, "--out", str(other), "--parquet"]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_benchmark_measures_every_inspect_path(tiny_dataset, capsys):
    assert main(["benchmark", str(tiny_dataset), "--end-to-end", "--image-size", "64", "--coreset-ratio", "0.1"]) == 0
    text = capsys.readouterr().out
    for path in ("detector scoring", "Inspector", "inspect --out --no-overlay", "inspect --out (overlays)", "--overlays rejected", "history"):
        assert path in text
    assert "overlays rejected drew" in text and "runtime: " in text  # the model runs as inspect runs it
    from defectlens.evaluation.end_to_end import run_end_to_end

    result = run_end_to_end(tiny_dataset, "patchcore", {"image_size": 64, "coreset_ratio": 0.1}, rounds=1)
    assert result.images == 12 and len(result.images_per_s) == 6 and all(v > 0 for v in result.images_per_s.values())
    assert 0 < result.rejected < 12
    assert result.ratios()["detector scoring"] == 1.0


def test_overlays_are_drawn_from_the_scoring_read_and_records_wait_for_them(tiny_dataset, tmp_path, monkeypatch):
    """inspect --out opens each image once: the overlay comes from the inspection's preview, and
    every record's overlay is on disk by the time its line is in results.jsonl."""
    import defectlens.batch.outputs as outputs

    def no_second_read(path):
        raise AssertionError(f"{path} read again for its overlay")

    monkeypatch.setattr(outputs, "load_rgb", no_second_read)
    model = tmp_path / "m.dlens"
    assert main(["fit", str(tiny_dataset), "-o", str(model), "--image-size", "64", "--coreset-ratio", "0.1", "--detector", "patchcore"]) == 0
    out = tmp_path / "out"
    assert main(["inspect", str(model), str(tiny_dataset / "test"), "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all(Path(r["overlay"]).is_file() for r in records)
    assert [r["source"] for r in records] == sorted(r["source"] for r in records)  # input order kept
    # --overlays rejected: a person on the line looks at the rejected parts only
    assert main(["inspect", str(model), str(tiny_dataset / "test"), "--out", str(out), "--fresh", "--overlays", "rejected"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    verdicts = {r["verdict"] for r in records}
    assert {"good", "defect"} <= verdicts
    assert all(("overlay" in r) == (r["verdict"] != "good") for r in records)
    assert all(Path(r["overlay"]).is_file() for r in records if "overlay" in r)
    assert main(["inspect", str(model), str(tiny_dataset / "test"), "--out", str(out), "--fresh", "--no-overlay"]) == 0
    assert not any("overlay" in json.loads(line) for line in (out / "results.jsonl").read_text().splitlines())
