"""The supervised classifier: refuses good-only data, learns from labelled defects, CAM maps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectlens import Bundle, create_detector, load_dataset
from defectlens.cli import main
from defectlens.errors import DefectLensError


def test_refuses_to_fit_without_defects(tiny_dataset):
    ds = load_dataset(tiny_dataset, validation_fraction=0.0)
    with pytest.raises(DefectLensError, match="needs labelled defect images"):
        create_detector("supervised", image_size=64).fit(ds.train_good)
    with pytest.raises(DefectLensError, match="labels"):
        create_detector("supervised", image_size=64).fit(ds.train_good, [0, 1])


def test_cam_map_lights_up_where_the_classifier_looks(tiny_dataset):
    ds = load_dataset(tiny_dataset, validation_fraction=0.0)
    defects = [s.path for s in ds.test if s.label]
    det = create_detector("supervised", image_size=64, epochs=6, batch_size=8).fit(ds.train_good + defects, [0] * 16 + [1] * 8)
    assert 0.0 <= det.threshold_ <= 1.0 and len(det.history_["train"]) == 6
    scores, maps = det.score([s.path for s in ds.test])
    assert np.all((scores >= 0) & (scores <= 1)) and maps.shape == (12, 64, 64)
    assert np.all(maps.reshape(12, -1).max(axis=1) <= scores + 1e-5)  # a map never exceeds its image's probability


def test_cli_fit_trains_on_half_the_labels_and_evaluation_skips_them(tiny_dataset, tmp_path):
    out = tmp_path / "s.dlens"
    assert main(["fit", str(tiny_dataset), "-o", str(out), "--detector", "supervised", "--image-size", "64", "--validation-fraction", "0.25"]) == 0
    bundle = Bundle.load(out)
    assert bundle.detector.name == "supervised" and bundle.metadata["labelled_defects"] == {"scratch": 2, "spot": 2}
    assert main(["evaluate", str(out), str(tiny_dataset), "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["excluded_calibration_images"] == 6 and result["metrics"]["n_defect"] == 4
