"""Tiling: tiles cover the image, stitching leaves no seams, small defects survive."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from defectlens import Bundle, Inspector, create_detector
from defectlens.detectors.tiling import blend_weights, stitch, tile_starts
from defectlens.errors import DefectLensError
from defectlens.metrics import image_auroc


def test_tiles_cover_the_image_and_end_flush():
    assert tile_starts(1250, 256, 192) == [0, 192, 384, 576, 768, 960, 994]
    assert tile_starts(200, 256, 192) == [0]
    assert tile_starts(256, 256, 192) == [0]


def test_stitching_crops_of_one_map_gives_that_map_back():
    yy, xx = np.mgrid[0:300, 0:500]
    truth = np.sin(yy / 17.0) + np.cos(xx / 23.0)
    tile, stride = 128, 96
    origins = [(y, x) for y in tile_starts(300, tile, stride) for x in tile_starts(500, tile, stride)]
    crops = np.stack([truth[y : y + tile, x : x + tile] for y, x in origins])
    np.testing.assert_allclose(stitch(crops, origins, 300, 500, tile - stride), truth, atol=1e-5)
    w = blend_weights(tile, 32)
    assert w[64, 64] == 1.0 and w[0, 0] < 0.001 and np.all(w > 0)


def _texture(rng: np.random.Generator, size: int, defect: bool) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    img = 0.5 + 0.2 * np.sin(xx / 3.0) + 0.02 * rng.standard_normal((size, size))
    if defect:  # a 4x4-pixel pit: after 8x downsampling, a quarter-strength speck in one pixel
        y, x = rng.integers(20, size - 20, 2)
        img[y : y + 4, x : x + 4] = 0.0
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pits(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("pits")
    paths = {"train": [], "good": [], "pit": []}
    for split, n, defect in (("train", 6, False), ("good", 5, False), ("pit", 5, True)):
        for i in range(n):
            p = root / f"{split}_{i}.png"
            Image.fromarray(_texture(rng, 384, defect)).save(p)
            paths[split].append(p)
    return paths


@pytest.mark.slow
def test_tiling_finds_defects_that_downsampling_loses(pits, tmp_path):
    test = pits["good"] + pits["pit"]
    labels = np.r_[np.zeros(5), np.ones(5)]
    small = create_detector("patchcore", image_size=48, coreset_ratio=0.1).fit(pits["train"])
    inner = {"coreset_ratio": 0.1, "batch_size": 8}
    tiled = create_detector("tiled", detector="patchcore", detector_params=inner, tile_size=96, map_size=128).fit(pits["train"])
    small_scores = small.score(test)[0]
    scores, maps = tiled.score(test)

    def margin(s: np.ndarray) -> float:  # weakest defect over strongest good image
        return float(s[5:].min() / s[:5].max())

    assert image_auroc(labels, scores) == 1.0 and margin(scores) > 1.5
    assert margin(scores) > 1.5 * margin(small_scores)
    assert maps.shape == (10, 128, 128) and tiled.n_train_tiles_ == 6 * 25
    # saved, loaded and inspected like any detector; the map comes back at the image's size
    path = Bundle(tiled).save(tmp_path / "tiled.dlens")
    insp = Inspector(Bundle.load(path)).inspect(pits["pit"][0])
    assert insp.anomaly_map.shape == (384, 384) and insp.score == pytest.approx(float(scores[5]), rel=1e-5)


def test_tiled_settings_are_checked():
    with pytest.raises(DefectLensError, match="tile_size"):
        create_detector("tiled", tile_size=50).fit(["x.png"])
    with pytest.raises(DefectLensError, match="cannot tile another tiled"):
        create_detector("tiled", detector="tiled").fit(["x.png"])


@pytest.mark.slow
def test_cli_fit_with_tiles(tiny_dataset, tmp_path):
    from defectlens.cli import main

    out = tmp_path / "t.dlens"
    assert main(["fit", str(tiny_dataset), "-o", str(out), "--tile", "32", "--image-size", "64", "--coreset-ratio", "0.1", "--detector", "patchcore"]) == 0
    det = Bundle.load(out).detector
    assert det.name == "tiled" and det.tile_size == 32 and det.detector_params["coreset_ratio"] == 0.1 and det.map_size == 64


def test_cli_fit_with_several_backbones_builds_an_ensemble(tiny_dataset, tmp_path):
    from defectlens.cli import main

    out = tmp_path / "e.dlens"
    assert main(["fit", str(tiny_dataset), "-o", str(out), "--detector", "padim", "--n-features", "16", "--scheme", "holdout",
                 "--validation-fraction", "0.25", "--backbone", "mobilenet_v2,efficientnet_lite0", "--image-size", "64"]) == 0
    det = Bundle.load(out).detector
    assert det.name == "ensemble" and det.detector == "padim"
    assert det.detector_params == {"n_features": 16, "random_state": 0}  # settings left out keep the detector's own defaults
