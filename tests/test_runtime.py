"""The default runtime: .dlens models scored in ONNX Runtime, cached beside the model, checked at
every load against PyTorch, and PyTorch with a one-line reason where that fails."""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectlens import Bundle, DefectLensError, create_detector, load_model
from defectlens.cli import main
from defectlens.cli.options import RUNTIMES as CLI_RUNTIMES
from defectlens.data import load_dataset
from defectlens.export import runtime
from defectlens.export.runtime import CACHE_DIR, RUNTIMES


@pytest.fixture(scope="module")
def data(tiny_dataset):
    return load_dataset(tiny_dataset, validation_fraction=0.0)


def _save(det, data, folder):
    return Bundle(det.fit(data.train_good)).save(folder / f"{det.name}.dlens")


def test_the_cli_offers_the_runtimes_and_overlay_modes_the_library_knows():
    from defectlens.batch.outputs import OVERLAY_MODES
    from defectlens.cli.options import OVERLAYS

    assert CLI_RUNTIMES == RUNTIMES and OVERLAYS == OVERLAY_MODES


def test_graphs_are_cached_by_checksum_and_a_damaged_one_is_built_again(data, tmp_path):
    path = _save(create_detector("patchcore", image_size=64, coreset_ratio=0.1), data, tmp_path)
    first = load_model(path)
    assert first.runtime.runtime == "onnx" and first.runtime.kinds == ["whole"] and "built now" in first.runtime.line()
    (cached,) = (tmp_path / CACHE_DIR).glob("*.onnx")
    assert cached.name.startswith(first.checksum[:16])
    assert "from the cache" in load_model(path).runtime.line()
    cached.write_bytes(b"not a graph")
    again = load_model(path)
    assert again.runtime.runtime == "onnx" and "built now" in again.runtime.line()
    assert cached.read_bytes() != b"not a graph"


def test_a_stale_graph_in_the_cache_is_caught_by_the_check(data, tmp_path):
    """A graph of another model under this model's name (a copied folder, a bug) never scores it."""
    a = _save(create_detector("patchcore", image_size=64, coreset_ratio=0.1), data, tmp_path / "a")
    b = _save(create_detector("patchcore", image_size=64, coreset_ratio=0.1, random_state=1, embed_dim=32), data, tmp_path / "b")
    load_model(a), load_model(b)
    (graph_a,) = (tmp_path / "a" / CACHE_DIR).glob("*.onnx")
    (graph_b,) = (tmp_path / "b" / CACHE_DIR).glob("*.onnx")
    graph_a.write_bytes(graph_b.read_bytes())
    reloaded = load_model(a)
    assert reloaded.runtime.runtime == "onnx" and "built now" in reloaded.runtime.line()
    torch_scores = load_model(a, "torch").detector.score(data.train_good[:3])[0]
    np.testing.assert_allclose(reloaded.detector.score(data.train_good[:3])[0], torch_scores, rtol=1e-4)


def test_a_model_that_disagrees_runs_in_pytorch_and_says_why(data, tmp_path, monkeypatch):
    path = _save(create_detector("padim", image_size=64, n_features=20), data, tmp_path)
    monkeypatch.setattr(runtime, "PARITY", 0.0)  # no graph matches to 0: every comparison fails
    bundle = load_model(path)
    line = bundle.runtime.line()
    assert bundle.runtime.runtime == "torch" and "differs from PyTorch" in line and "\n" not in line
    assert bundle.detector._graph_scorer is None  # PyTorch really is back in place
    np.testing.assert_array_equal(bundle.detector.score(data.train_good[:2])[0], load_model(path, "torch").detector.score(data.train_good[:2])[0])
    with pytest.raises(DefectLensError, match="--runtime onnx: ONNX Runtime differs"):
        load_model(path, "onnx")


def test_patch_scoring_that_the_graph_cannot_express_keeps_only_the_backbone_in_onnx(data, tmp_path):
    """PatchCore with an IVF index and reweighting: the embedder in ONNX Runtime, faiss and the reweighting in Python."""
    det = create_detector("patchcore", image_size=64, coreset_ratio=0.2, search="ivf", reweight=True)
    path = _save(det, data, tmp_path)
    bundle = load_model(path)
    assert bundle.runtime.runtime == "onnx" and bundle.runtime.kinds == ["backbone"] and "1 backbone graph" in bundle.runtime.line()
    np.testing.assert_allclose(bundle.detector.score(data.train_good[:4])[0], det.score(data.train_good[:4])[0], rtol=1e-4)


def test_the_cli_runs_the_runtime_it_is_asked_for(model_dir, tiny_dataset, tmp_path, capsys):
    model = model_dir / "discs.dlens"
    images = str(tiny_dataset / "test" / "good")
    assert main(["inspect", str(model), images, "--runtime", "torch", "--out", str(tmp_path / "t")]) == 0
    record = json.loads((tmp_path / "t" / "results.jsonl").read_text().splitlines()[0])
    assert "backbone" in record["timings_ms"] and "graph" not in record["timings_ms"]
    assert "runtime: PyTorch (asked for with --runtime torch)" in capsys.readouterr().err
    assert main(["evaluate", str(model), str(tiny_dataset), "--out", str(tmp_path / "e.json")]) == 0
    assert "runtime: ONNX Runtime (1 whole graph" in capsys.readouterr().out
    exported = tmp_path / "discs.onnx"
    assert main(["export", str(model), "-o", str(exported)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(exported), images]) == 0
    assert "runtime: ONNX Runtime (1 whole graph, an exported file); checked against PyTorch when it was exported" in capsys.readouterr().err
    assert main(["inspect", str(exported), images, "--runtime", "torch"]) == 2
    assert "ONNX export runs in ONNX Runtime only" in capsys.readouterr().err
