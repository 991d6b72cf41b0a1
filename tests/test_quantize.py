"""int8 backbones: what is quantised, what stays float, and the benchmark that judges them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from defectlens.cli.main import main
from defectlens.data.datasets import load_dataset
from defectlens.detectors import create_detector
from defectlens.export.quantize import quantize_embedder
from defectlens.export.runtime import install_embedder, restore

pytestmark = pytest.mark.slow


def test_only_the_backbone_is_quantised_and_the_bank_is_rebuilt_through_it(tiny_dataset):
    train = load_dataset(tiny_dataset, validation_fraction=0.0).train_good
    det = create_detector("patchcore", image_size=64, coreset_ratio=0.1).fit(train)
    graph = quantize_embedder(det, train)
    nodes = onnx.load_from_string(graph).graph.node
    dequantised = {out for n in nodes if n.op_type == "DequantizeLinear" for out in n.output}
    convs = {n.name: n.input[1] in dequantised for n in nodes if n.op_type == "Conv"}  # int8 weights
    assert any(convs.values()) and all("/extractor/" in name for name, int8 in convs.items() if int8)
    assert any(not int8 for name, int8 in convs.items() if "/extractor/" not in name)  # the projection stays float
    pixels = torch.rand(2, 3, 64, 64)
    before = det._embed(pixels).numpy()
    bank = det.memory_bank_.copy()
    install_embedder(det, graph)
    after = det._embed(pixels).numpy()
    assert after.shape == before.shape and np.corrcoef(before.ravel(), after.ravel())[0, 1] > 0.8
    det.fit_bank(train)
    assert det.memory_bank_.shape == bank.shape and not np.array_equal(det.memory_bank_, bank)
    restore(det)
    assert np.allclose(det._embed(pixels).numpy(), before, atol=1e-5)


def test_int8_benchmark_prints_a_row_per_category_and_the_rule(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "int8.json"
    assert main(["benchmark", str(tiny_dataset), "--int8", "--image-size", "64", "--coreset-ratio", "0.1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| category | test images | embedding correlation" in text and "kept by the rule" in text
    import json

    (row,) = json.loads(out.read_text())
    assert row["images"] == 12 and row["images_per_s_float"] > 0 and row["images_per_s_int8"] > 0
    assert 0.5 < row["feature_correlation"] <= 1 and row["kept"] == (abs(row["auroc_int8"] - row["auroc_float"]) <= 0.005
                                                                      and row["map_correlation"] >= 0.99)
