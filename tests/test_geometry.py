"""Model inputs in the part's proportions: (height, width) sizes, so tall or wide parts are not squashed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectlens import create_detector, load_model
from defectlens.cli import main
from defectlens.data import load_dataset
from defectlens.data.images import format_size, load_for_model, parse_size
from defectlens.errors import DefectLensError
from defectlens.export.parity import export_checked
from defectlens.workflows import calibrate_detector
from defectlens.workflows.selection import candidates, geometry_for

TALL = (96, 48)  # (height, width)
SETTINGS = {
    "patchcore": {"coreset_ratio": 0.1},
    "padim": {"n_features": 20},
    "simplenet": {"embed_dim": 16, "hidden": 32, "max_epochs": 4},
}


@pytest.fixture(scope="module")
def tall_dataset(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny data set stretched to 40 x 120 px: tall parts, masks stretched with them."""
    root = tmp_path_factory.mktemp("tall") / "discs"
    shutil.copytree(tiny_dataset, root)
    for path in root.rglob("*.png"):
        with Image.open(path) as im:
            im.resize((40, 120), Image.NEAREST if "ground_truth" in path.parts else Image.BILINEAR).save(path)
    return root


def test_sizes_are_written_width_by_height_and_kept_height_first():
    assert parse_size("256") == 256 and parse_size("256x256") == 256
    assert parse_size("256x640") == (640, 256) and parse_size("640X256") == (256, 640)
    assert format_size((640, 256)) == "256x640" and format_size([256, 256]) == "256"
    for bad in ("", "a", "256x", "1x2x3", "-1"):
        with pytest.raises(DefectLensError, match="WIDTHxHEIGHT"):
            parse_size(bad)


def test_images_are_resized_to_the_rectangle(tall_dataset):
    loaded = load_for_model(next((tall_dataset / "train" / "good").iterdir()), TALL)
    assert loaded.pixels.shape == (3, 96, 48) and loaded.size == (120, 40)
    assert load_for_model(np.zeros((10, 30, 3), np.float32), TALL).pixels.shape == (3, 96, 48)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_feature_detectors_fit_score_save_and_export_at_a_rectangle(name, tall_dataset, tmp_path):
    ds = load_dataset(tall_dataset, validation_fraction=0.25)
    det = create_detector(name, image_size=TALL, **SETTINGS[name]).fit(ds.train_good)
    paths = [s.path for s in ds.test]
    scores, maps = det.score(paths)
    assert maps.shape == (len(paths), *TALL)
    labels = np.array([s.label for s in ds.test])
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    bundle = calibrate_detector(det, ds.validation)
    path = bundle.save(tmp_path / "m.dlens")
    loaded = load_model(path, "torch")
    assert np.array_equal(loaded.detector.score(paths)[0], scores)  # the size survives the model file's JSON
    assert load_model(path).runtime.runtime == "onnx"  # the default runtime's graph takes the rectangle too
    parity = export_checked(bundle, tmp_path / "m.onnx", paths[:4])
    assert parity.score_diff <= 1e-4 * max(1.0, float(np.abs(scores).max()))
    inspection = load_model(tmp_path / "m.onnx").detector.score(paths[:1])[1]
    assert inspection.shape == (1, *TALL)


def test_sizes_outside_the_strides_are_refused_in_one_line():
    with pytest.raises(DefectLensError, match="multiple of 16 between 32 and 4096, got 40x96"):
        create_detector("padim", image_size=(96, 40)).fit([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(DefectLensError, match="the autoencoder is square"):
        create_detector("autoencoder", image_size=(96, 48)).fit([np.zeros((8, 8, 3), np.float32)])


def test_auto_offers_the_parts_proportions_only_for_elongated_images():
    assert geometry_for([(300, 320)] * 4, 256) is None  # near square: resizing to a square squashes little
    assert geometry_for([(1250, 500)] * 4, 256) == (400, 160)  # tall: the square's pixels in the part's shape
    assert geometry_for([(64, 1024)] * 4, 256) == (128, 512)  # a line scan is capped at 4:1 (tiling sees it natively)
    assert geometry_for([(1250, 500)] * 4, (640, 256)) is None  # a rectangle the user gave is kept as given
    images = [np.zeros((120, 40, 3), np.float32)] * 4
    labels = [c.label for c in candidates(images, image_size=64)]
    assert "padim@64x112" in labels and "patchcore@64x112" in labels
    assert not any("@" in c.label for c in candidates([np.zeros((40, 44, 3), np.float32)] * 4, image_size=64))


def test_fit_and_evaluate_take_a_rectangle_on_the_command_line(tall_dataset, tmp_path, capsys):
    model = tmp_path / "tall.dlens"
    assert main(["fit", str(tall_dataset), "-o", str(model), "--detector", "padim", "--image-size", "48x96", "--n-features", "20"]) == 0
    manifest = json.loads(__import__("zipfile").ZipFile(model).read("manifest.json"))
    assert manifest["detector"]["params"]["image_size"] == [96, 48]
    assert main(["evaluate", str(model), str(tall_dataset), "--out", str(tmp_path / "metrics.json"), "--report", str(tmp_path / "report")]) == 0
    assert "pixel AUROC" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", str(tall_dataset), "-o", str(model), "--detector", "padim", "--image-size", "48by96"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
