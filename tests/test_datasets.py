from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectlens.data import load_dataset
from defectlens.errors import DatasetError


def _img(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)
    return path


def test_mvtec_layout_with_masks_and_summary(tiny_dataset):
    ds = load_dataset(tiny_dataset, validation_fraction=0.25)
    assert ds.layout == "mvtec"
    assert len(ds.train_good) == 12 and len(ds.validation) == 4
    assert not set(ds.train_good) & set(ds.validation)
    assert ds.defect_types == ["scratch", "spot"]
    assert all(s.mask_path is not None for s in ds.test if s.label)
    summary = ds.summary()
    assert "train good: 12" in summary and "test scratch: 4   masks 4/4" in summary and "64x64 RGB" in summary


def test_a_validation_good_folder_is_the_calibration_set(tmp_path):
    """MVTec LOCO / 3D-AD / VisA layouts: validation/good calibrates, all of train/good trains."""
    root = tmp_path / "part"
    train = [_img(root / "train" / "good" / f"{i}.png") for i in range(6)]
    val = [_img(root / "validation" / "good" / f"v{i}.png") for i in range(3)]
    _img(root / "test" / "good" / "t.png")
    ds = load_dataset(root, validation_fraction=0.5)
    assert ds.train_good == train and ds.validation == val and ds.validation_source == "validation/good"
    assert "validation good (validation/good): 3" in ds.summary()
    assert load_dataset(root, validation_fraction=0.0).validation == val


def test_missing_masks_are_reported(tmp_path):
    root = tmp_path / "cat"
    for i in range(3):
        _img(root / "train" / "good" / f"{i}.png")
    _img(root / "test" / "good" / "0.png")
    _img(root / "test" / "dent" / "0.png")
    ds = load_dataset(root)
    assert ds.test[1].mask_path is None
    assert "masks 0/1" in ds.summary() and "no mask" in ds.summary()


def test_plain_folders(tmp_path):
    for i in range(10):
        _img(tmp_path / "good" / f"g{i}.png")
    _img(tmp_path / "scratch" / "s0.png", 10)
    _img(tmp_path / "masks" / "scratch" / "s0.png", 255)
    ds = load_dataset(tmp_path, validation_fraction=0.2)
    assert ds.layout == "folders"
    goods_in_test = [s for s in ds.test if s.label == 0]
    assert len(goods_in_test) == 2 and len(ds.train_good) + len(ds.validation) == 8
    defect = [s for s in ds.test if s.label == 1][0]
    assert defect.defect_type == "scratch" and defect.mask_path.name == "s0.png"


def test_single_folder_of_good_images(tmp_path):
    for i in range(5):
        _img(tmp_path / f"{i}.jpg")
    ds = load_dataset(tmp_path, validation_fraction=0.2)
    assert len(ds.train_good) == 4 and len(ds.validation) == 1 and ds.test == []


def test_errors_name_the_input(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset(tmp_path)
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training images"):
        load_dataset(tmp_path / "cat")
    _img(tmp_path / "cat" / "train" / "good" / "a.png")
    with pytest.raises(DatasetError, match="several categories"):
        load_dataset(tmp_path)


@pytest.mark.parametrize(("n", "held"), [(40, 4), (112, 28), (209, 30), (395, 40), (396, 99), (596, 99), (597, 199), (761, 199),
                                         (1000, 199), (3000, 300)])
def test_holdout_keeps_enough_images_for_a_useful_promise(n, held):
    """A tenth, but with 100+ images at least 30 (the largest of 30 promises FRR <= 3.2 %) while
    three quarters remain to fit on, with 396+ at least 99 (the 2 % threshold is then the second
    largest score) while three quarters remain, and with 597+ at least 199 (the fourth; 1 %: the
    second) while two thirds remain; small sets keep a tenth and are calibrated by k-fold."""
    from defectlens.data.datasets import _split_validation

    paths = [Path(f"{i:04d}.png") for i in range(n)]
    train, val = _split_validation(paths, 0.1, 0)
    assert len(val) == held and len(train) + len(val) == n and not set(train) & set(val)
