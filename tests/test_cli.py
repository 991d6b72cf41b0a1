from __future__ import annotations

import json

import pytest

from defectlens import Bundle
from defectlens.cli import main
from defectlens.cli.main import build_parser
from defectlens.cli.options import NOT_FLAGS, detector_parameters, parameters

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)

SMALL = ["--image-size", "64", "--coreset-ratio", "0.1", "--detector", "patchcore"]


@pytest.fixture(scope="module")
def model(tiny_dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.dlens"
    assert main(["fit", str(tiny_dataset), "-o", str(path), "--validation-fraction", "0.25", *SMALL]) == 0
    return path


@pytest.mark.parametrize("verb", COMMANDS)
def test_help_on_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    assert "usage: defectlens" in capsys.readouterr().out


def test_detector_options_read_from_source_match_the_imported_detectors():
    from defectlens.detectors import available_detectors, detector_class

    declared = detector_parameters()
    assert sorted(declared) == available_detectors()
    for name, params in declared.items():
        defaults = detector_class(name)().get_params()
        assert sorted(params) == sorted(defaults), name
        assert {k: d for k, (_, d) in params.items()} == defaults, name
    documented = {p.name: p.doc for p in parameters()}
    assert set(documented) == {k for params in declared.values() for k in params} - NOT_FLAGS
    assert all(documented.values()), [k for k, v in documented.items() if not v]  # a new detector's settings need a docstring


def test_only_given_detector_options_reach_the_detector():
    args = build_parser().parse_args(["fit", "data", "-o", "m.dlens", "--detector", "padim", "--n-features", "50", "--embed-dim", "0",
                                      "--coreset-ratio", "0.2", "--reweight"])
    assert args.n_features == 50 and args.embed_dim is None and args.reweight is True and not hasattr(args, "image_size")
    from defectlens.cli.options import detector_params

    assert detector_params(args) == {"n_features": 50, "random_state": 0}  # PaDiM has no coreset or reweighting
    assert detector_params(args, "patchcore") == {"embed_dim": None, "coreset_ratio": 0.2, "reweight": True, "random_state": 0}


@pytest.mark.parametrize(("text", "value"), [("auto", "auto"), ("0.25", 0.25)])
def test_a_setting_that_is_a_number_or_a_word_takes_either(text, value):
    args = build_parser().parse_args(["fit", "data", "-o", "m.dlens", "--detector", "simplenet", "--pooling", text])
    assert args.pooling == value


def test_help_loads_no_model_code():
    import subprocess
    import sys

    code = ("import sys; from defectlens.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'faiss', 'scipy', 'numpy') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_fit_saves_a_calibrated_model(model):
    bundle = Bundle.load(model)
    # 4 held-out images are too few for a holdout: auto calibration switches to k-fold over all 16
    cal = bundle.calibration
    assert cal is not None and cal.n_good == 16 and cal.source == "kfold-10" and cal.strategy == "target_frr"
    assert 0 <= cal.expected_frr["ci95"][0] <= cal.expected_frr["expected"] <= cal.expected_frr["ci95"][1] <= 1
    assert bundle.metadata["name"] == "discs" and bundle.metadata["train_images"] == 16
    assert len(bundle.metadata["train_files"]) == 16


def test_inspect_writes_records_and_overlays(model, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["inspect", str(model), str(tiny_dataset / "test"), "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 12
    for r in records:
        assert r["verdict"] in ("good", "defect") and r["score"] > 0 and "graph" in r["timings_ms"]  # the default runtime: the whole model as one ONNX graph
        assert (out / "overlays").joinpath(r["overlay"].split("/")[-1]).is_file()
    spots = [r for r in records if "/spot/" in r["source"]]
    assert sum(r["verdict"] == "defect" for r in spots) >= 3
    assert any(r["regions"] for r in spots)
    assert "inspected 12 images" in capsys.readouterr().out
    for r in records:
        assert 0 <= r["normalised_score"] <= 1 and (r["normalised_score"] > 0.5) == (r["verdict"] == "defect")
        assert 0 <= r["confidence"] <= 1 and 0 <= r["severity"] <= 1
        for region in r["regions"]:
            assert region["type_source"] == "heuristic" and region["type"].endswith("-like") and 0 <= region["severity"] <= 1


def test_inspect_writes_csv_summary_statistics_and_maps(model, tiny_dataset, tmp_path):
    import csv

    import numpy as np

    out = tmp_path / "batch"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG truncated")
    assert main(["inspect", str(model), str(tiny_dataset / "test"), str(bad), "--out", str(out), "--no-overlay", "--save-maps", "--mask", "otsu"]) == 0
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 13 and rows[-1]["verdict"] == "error" and "broken.png" in rows[-1]["error"]
    assert all(float(r["total_ms"]) > 0 and int(r["regions"]) >= 0 for r in rows[:-1])
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["by_folder"]) == {"good", "scratch", "spot"}
    spot = stats["by_folder"]["spot"]
    assert spot["n"] == 4 and spot["mean"] <= spot["p90"] <= spot["max"] and spot["std"] >= 0
    assert sum(g["n"] for g in stats["by_verdict"].values()) == 12
    maps = sorted((out / "maps").glob("*.npy"))
    assert len(maps) == 12 and np.load(maps[0]).shape == (64, 64)
    assert not (out / "overlays").exists()


def test_inspect_skips_unreadable_files(model, tiny_dataset, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    good = next((tiny_dataset / "test" / "good").iterdir())
    assert main(["inspect", str(model), str(good), str(bad)]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert lines[0]["source"] == str(good) and "error" in lines[1]
    assert "bad.png" in captured.err and "Traceback" not in captured.err


def test_evaluate_prints_table_and_writes_json(model, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(model), str(tiny_dataset), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "image AUROC" in text and "AUPRO" in text
    result = json.loads(out.read_text())
    assert result["metrics"]["image_auroc"] > 0.8
    assert len(result["records"]) == 12 and set(result["per_type"]) == {"scratch", "spot"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "missing.dlens", "x.png"], "model file not found"),
        (["fit", "no/such/folder", "-o", "m.dlens"], "data set folder not found"),
        (["fit", "{data}", "-o", "{tmp}/m.dlens", "--backbone", "resnet9000"], "unknown backbone"),
        (["evaluate", "{data}/test/good/000.png", "{data}"], "not a DefectLens model"),
        (["inspect", "{model}", "{tmp}/nothing.png"], "nothing.png: file not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, model, tiny_dataset, tmp_path, capsys):
    argv = [a.format(data=tiny_dataset, tmp=tmp_path, model=model) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("defectlens: error:")


@pytest.mark.slow
def test_demo_runs_on_generated_data_when_no_real_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ../shared from here
    assert main(["demo", "--out", "demo"]) == 0
    out = capsys.readouterr().out
    assert "generating the demo data set" in out
    result = json.loads((tmp_path / "demo" / "evaluation.json").read_text())
    assert result["metrics"]["image_auroc"] >= 0.95
    assert list((tmp_path / "demo" / "inspections" / "overlays").glob("*.jpg"))
    assert (tmp_path / "demo" / "discs.dlens").is_file()


def test_cli_stays_thin():
    """Commands parse, call a workflow and print: a long function in cli/ is a workflow that belongs below it."""
    import ast
    from pathlib import Path

    import defectlens.cli

    long = [(p.name, f.name, f.end_lineno - f.lineno + 1) for p in Path(defectlens.cli.__file__).parent.glob("*.py")
            for f in ast.walk(ast.parse(p.read_text())) if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 40]
    assert not long, long
