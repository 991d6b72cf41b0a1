"""The multi-detector benchmark table: every combination on every category, one row each."""

from __future__ import annotations

import json
import os

import pytest

from defectlens.cli import main
from defectlens.data.synthetic import make_synthetic_dataset
from defectlens.errors import DatasetError
from defectlens.evaluation.comparison import find_categories, in_fresh_process


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("cats")
    for name, seed in (("line1", 1), ("line2", 2)):
        make_synthetic_dataset(base / name, n_train=10, n_test_good=3, n_test_defect=3, size=64, seed=seed)
    return base


def test_categories_are_found_below_a_root(root, tmp_path):
    assert [p.relative_to(root).as_posix() for p in find_categories(root)] == ["line1/discs", "line2/discs"]
    assert find_categories(root / "line1" / "discs") == [root / "line1" / "discs"]
    with pytest.raises(DatasetError, match="no category folders"):
        find_categories(tmp_path)


@pytest.mark.slow
def test_benchmark_compares_every_detector_on_every_category(root, tmp_path, capsys):
    out = tmp_path / "table"
    assert main(["benchmark", str(root), "--detectors", "patchcore,padim,supervised", "--image-size", "64", "--coreset-ratio", "0.1",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    assert [(r["category"], r["detector"]) for r in rows] == [
        ("line1/discs", "patchcore"), ("line1/discs", "padim"), ("line1/discs", "supervised"),
        ("line2/discs", "patchcore"), ("line2/discs", "padim"), ("line2/discs", "supervised")]
    for r in rows:
        assert not r["error"] and 0.5 <= r["image_auroc"] <= 1 and r["fit_s"] > 0 and r["ms_per_image"] > 0 and r["peak_mb"] > 100
    md = (out / "benchmark.md").read_text()
    assert md.count("| line1/discs |") == 3 and "Best image AUROC per category" in md and "Machine:" in md
    assert "| category | detector |" in capsys.readouterr().out


def test_unknown_names_fail_before_any_fitting(root, capsys):
    assert main(["benchmark", str(root), "--detectors", "patchcore,nope"]) == 2
    assert "unknown detector 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_wrappers_name_the_detector_they_wrap(root, tmp_path):
    out = tmp_path / "wrapped"
    assert main(["benchmark", str(root / "line1"), "--detectors", "tiled:padim,ensemble:padim", "--tile", "48", "--image-size", "64",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    assert [(r["detector"], r["backbone"]) for r in rows] == [
        ("tiled:padim", "mobilenet_v2"), ("ensemble:padim", "mobilenet_v2,efficientnet_lite0")]
    for r in rows:
        assert not r["error"] and 0.5 <= r["image_auroc"] <= 1


def test_a_detector_that_wraps_nothing_is_refused():
    from defectlens.detectors import create_from_spec
    from defectlens.errors import DefectLensError

    with pytest.raises(DefectLensError, match="wraps no other detector"):
        create_from_spec("padim:patchcore", {})
    tiled = create_from_spec("tiled:padim", {"tile_size": 64, "image_size": 128, "n_features": 50, "coreset_ratio": 0.1})
    assert tiled.tile_size == 64 and tiled.detector == "padim" and tiled.detector_params == {"image_size": 128, "n_features": 50}


@pytest.mark.slow
def test_a_run_whose_process_dies_becomes_a_row(root, tmp_path, monkeypatch):
    import defectlens.evaluation.comparison as comparison

    monkeypatch.setattr(comparison, "_run_one", _die)
    rows = comparison.compare(root / "line1", ["padim"], ["mobilenet_v2"], progress=lambda _: None)
    assert len(rows) == 1 and "killed" in rows[0].error


def _die(*_args):
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_single_category_benchmark_prints_stages_settings_and_onnx(root, tmp_path, capsys):
    category = str(root / "line1" / "discs")
    out = tmp_path / "bench.json"
    assert main(["benchmark", category, "--image-size", "64", "--coreset-ratio", "0.1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "stages (ms/image):" in printed and "exported ONNX graph:" in printed
    assert "default runtime:" in printed and "x PyTorch" in printed  # each runtime beside PyTorch, from the same run
    figures = json.loads(out.read_text())
    for path in ("onnx", "runtime"):
        assert figures[path]["max_score_diff"] <= 1e-4 and figures[path]["max_map_diff"] <= 1e-4
    assert figures["runtime"]["runtime"].startswith("ONNX Runtime (1 whole graph")
    assert figures["settings"] == {"image_size": 64, "coreset_ratio": 0.1}
    assert main(["benchmark", category, "--image-size", "64", "--coreset-ratio", "0.1", "--search", "ivf"]) == 0
    printed = capsys.readouterr().out
    assert "search=ivf" in printed and "exported ONNX graph:" not in printed  # approximate search is not exported
    assert "default runtime:" in printed and "1 backbone graph" in printed  # but its backbone runs in ONNX Runtime


def test_each_run_is_a_fresh_process_in_the_callers_folder_and_environment(tmp_path, monkeypatch):
    """Runs fork from a fork server started by the first one; each still starts where the caller is now."""
    first = in_fresh_process(os.getpid)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEFECTLENS_PROBE", "here")
    assert in_fresh_process(os.getcwd) == str(tmp_path)
    assert in_fresh_process(os.getenv, "DEFECTLENS_PROBE") == "here"
    assert in_fresh_process(os.getpid) not in (first, os.getpid())
