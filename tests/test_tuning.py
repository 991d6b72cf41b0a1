"""Thread and batch tuning: measured by `benchmark --tune`, stored per machine, applied where a model loads."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from defectlens.cli import main
from defectlens.evaluation.tune import Point, _pick, run_tune, thread_counts
from defectlens.inference.inspector import Inspector
from defectlens.inference.loading import load_model
from defectlens.inference.tuning import TUNING_ENV, Tuning, save_tuning, stored_tuning, tuning_file


@pytest.fixture()
def tuning_path(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(TUNING_ENV, str(path))
    return path


def test_thread_counts_double_up_to_the_usable_cores():
    assert thread_counts(1) == [1]
    assert thread_counts(2) == [1, 2]
    assert thread_counts(6) == [1, 2, 4, 6]
    assert thread_counts(16) == [1, 2, 4, 8, 16]


def test_the_pick_is_the_smallest_batch_within_reach_of_the_fastest():
    points = [Point(2, 8, 2, 2, 100.0), Point(2, 2, 2, 2, 98.0), Point(1, 1, 1, 1, 60.0), Point(2, 4, 1, 2, 98.5)]
    assert _pick(points) == points[1]  # 2 % slower than the best, a quarter of its batch
    assert _pick([points[0], points[2]]) == points[0]  # nothing else comes close


def test_a_stored_tuning_is_read_back_on_this_machine_only(tuning_path):
    tuning = Tuning(1, 4, 1, 1, measured="today")
    assert save_tuning(tuning) == tuning_path and tuning_file() == tuning_path
    assert stored_tuning() == (tuning, "")
    tuning_path.write_text(json.dumps({**asdict(tuning), "machine": "a CPU elsewhere, 64 usable cores"}))
    found, why = stored_tuning()
    assert found is None and "another machine" in why and "--tune" in why
    tuning_path.write_text("{not json")
    found, why = stored_tuning()
    assert found is None and str(tuning_path) in why and "\n" not in why


def test_tuning_off_ignores_a_stored_file(tuning_path, monkeypatch):
    save_tuning(Tuning(1, 4, 1, 1))
    monkeypatch.setenv(TUNING_ENV, "off")
    assert tuning_file() is None and stored_tuning()[0] is None


def test_a_loaded_model_runs_with_the_tuning_and_scores_the_same(model_dir, tiny_dataset, tuning_path):
    images = sorted((tiny_dataset / "test").rglob("*.png"))
    plain = Inspector.load(model_dir / "discs.dlens", tuning=None)
    assert plain.batch_size is None and "tuned" not in plain.bundle.runtime.line()
    threads = torch.get_num_threads()
    try:
        save_tuning(Tuning(1, 3, 1, 1, measured="a test"))
        tuned = Inspector.load(model_dir / "discs.dlens")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert (tuned.batch_size, tuned.decode_workers) == (3, 1)
    assert "tuned: 1 threads, batch 3, 1 decoding threads" in tuned.bundle.runtime.line()
    a = [r.score for r in plain.inspect_many(images)]
    b = [r.score for r in tuned.inspect_many(images)]
    np.testing.assert_allclose(a, b, rtol=1e-5)
    tuning_path.write_text(json.dumps({**asdict(Tuning(1, 3, 1, 1)), "machine": "elsewhere"}))
    untuned = load_model(model_dir / "discs.dlens")
    assert untuned.tuning is None and "untuned: " in untuned.runtime.line() and "another machine" in untuned.runtime.line()


def test_run_tune_measures_every_point_and_prefers_the_defaults_speed_or_better(tiny_dataset):
    result = run_tune(tiny_dataset, "patchcore", {"image_size": 64, "coreset_ratio": 0.1}, images=8, rounds=1, threads=[1],
                      batches=(1, 4), decoders=(1, 2))
    grid = {(p.threads, p.batch_size, p.decode_workers) for p in result.points}
    assert {(1, 1, 1), (1, 1, 2), (1, 4, 1), (1, 4, 2)} <= grid
    assert all(p.images_per_s > 0 for p in result.points) and result.default.images_per_s > 0
    best = max(p.images_per_s for p in result.points)
    assert result.chosen.images_per_s >= 0.97 * best - 1e-9
    assert (result.chosen.threads, result.chosen.batch_size, result.chosen.decode_workers) in grid
    assert set(result.latency_ms) >= {1} and "images/s" in result.text() and result.chosen.line() in result.text()


def test_benchmark_tune_prints_the_table_and_stores_the_winner(tiny_dataset, tuning_path, capsys, monkeypatch):
    import defectlens.evaluation.tune as tune

    monkeypatch.setattr(tune, "BATCHES", (1, 2))  # a small grid: the full one takes a minute
    monkeypatch.setattr(tune, "DECODERS", (1,))
    monkeypatch.setattr(tune, "IMAGES", 8)
    monkeypatch.setattr(tune, "ROUNDS", 1)
    monkeypatch.setattr(tune, "thread_counts", lambda: [1])
    threads = torch.get_num_threads()
    assert main(["benchmark", str(tiny_dataset), "--tune", "--image-size", "64", "--coreset-ratio", "0.1"]) == 0
    assert torch.get_num_threads() == threads  # measuring leaves the process as it found it
    out = capsys.readouterr().out
    assert "| threads | batch |" in out and f"stored in {tuning_path}" in out
    stored, _ = stored_tuning()
    assert stored is not None and stored.batch_size in (1, 2) and stored.threads == 1
    assert replace(stored, measured="") != stored  # it says when and with what it was measured
