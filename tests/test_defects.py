"""Synthetic defects: deterministic, honest masks, sizes near the asked area, every image shape."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from defectlens.cli import main
from defectlens.data.defects import ALL_FAMILIES, FAMILIES, LOGICAL, LOGICAL_AREA, VISIBLE, make_defect, perlin, synthesize, write_gallery
from defectlens.data.synthetic import make_synthetic_dataset


def textured(seed: int, shape: tuple[int, int] = (128, 128), grey: bool = False) -> np.ndarray:
    """Stripes plus smooth blotches in colour: texture everywhere, so every family has something to change."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    base = 0.5 + 0.15 * np.sin(xx * 0.4 + yy * 0.1) + ndimage.gaussian_filter(rng.normal(0, 1, shape), 3) * 0.6
    rgb = np.stack([base, base * 0.9 + 0.05, base * 0.8 + 0.1], axis=2)
    rgb = np.clip(rgb + rng.normal(0, 0.01, rgb.shape), 0, 1).astype(np.float32)
    return np.repeat(rgb[..., :1], 3, axis=2) if grey else rgb


def typical_area(family: str, local: float) -> float:
    """The asked area for a local family; a logical defect is a component, so in LOGICAL_AREA."""
    return 0.1 if family == LOGICAL else local


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_changes_about_the_asked_area_and_only_inside_its_mask(family):
    img, donor = textured(0), textured(1)
    area = typical_area(family, 0.01)
    for seed in range(3):
        d = make_defect(img, np.random.default_rng(seed), family, area, donor)
        assert d.family == family and d.image.dtype == np.float32 and d.image.shape == img.shape and d.mask.shape == img.shape[:2]
        assert d.image.min() >= 0 and d.image.max() <= 1
        assert d.area == pytest.approx(d.mask.mean()) and area / 3 <= d.area <= area * 3, (seed, d.area)
        assert np.array_equal(d.image[~d.mask], img[~d.mask]), "pixels outside the mask must be untouched"
        change = np.abs(d.image - img).max(axis=2)
        visible = change >= VISIBLE
        assert (visible & d.mask).sum() >= 0.5 * d.mask.sum(), "most of the mask must be a visible change"


def test_same_seed_same_defects_and_another_seed_others():
    images = [textured(i) for i in range(3)]
    a, b = synthesize(images, 12, seed=5), synthesize(images, 12, seed=5)
    assert [d.family for d in a] == list(FAMILIES) * 2  # the local ones unless asked: the logical family is judged apart
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
    c = synthesize(images, 12, seed=6)
    assert any(not np.array_equal(x.mask, y.mask) for x, y in zip(a, c, strict=True))
    # a defect depends on its seed and position only, not on how many are made
    assert np.array_equal(synthesize(images, 3, seed=5)[2].image, a[2].image)


def test_areas_stay_within_the_asked_range():
    defects = synthesize([textured(i) for i in range(2)], 24, seed=1, min_area=0.002, max_area=0.05)
    areas = np.array([d.area for d in defects])
    assert (areas > 0).all() and areas.min() >= 0.002 / 3 and areas.max() <= 0.05 * 3
    # the logical family keeps its own range: a misplaced component is not a pinhole
    logical = np.array([d.area for d in synthesize([textured(i) for i in range(2)], 8, seed=1, families=[LOGICAL], max_area=0.01)])
    assert logical.min() >= LOGICAL_AREA[0] / 3 and logical.max() <= LOGICAL_AREA[1] * 3


def plate(seed: int, size: int = 128) -> np.ndarray:
    """A part with structure at the scale of a component: grey board, four dark squares, fine grain."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 0.7, np.float32) + rng.normal(0, 0.01, (size, size, 3)).astype(np.float32)
    q = size // 4
    for y in (q // 2, size - q - q // 2):
        for x in (q // 2, size - q - q // 2):
            img[y:y + q, x:x + q] = (0.15, 0.2, 0.5)
    return np.clip(img, 0, 1)


def test_logical_defects_move_remove_or_recolour_whole_components():
    img = plate(0)
    board, square = np.array([0.7, 0.7, 0.7]), np.array([0.15, 0.2, 0.5])
    own = 0
    for seed in range(12):
        d = make_defect(img, np.random.default_rng(seed), LOGICAL, 0.1, plate(1))
        assert LOGICAL_AREA[0] / 3 <= d.area <= LOGICAL_AREA[1] * 2 and np.array_equal(d.image[~d.mask], img[~d.mask])
        # visible at the scale of a component, not only pixel by pixel (a shuffled texture would be)
        coarse = np.abs(ndimage.gaussian_filter(d.image, (4, 4, 0)) - ndimage.gaussian_filter(img, (4, 4, 0))).max(axis=2)
        assert (coarse[d.mask] >= 2 * VISIBLE).mean() >= 0.25, seed
        # moved or removed: only the part's own colours (and blends of them); recoloured: new ones
        t = np.clip((d.image[d.mask] - square) @ (board - square) / np.sum((board - square) ** 2), 0, 1)
        own += np.percentile(np.linalg.norm(d.image[d.mask] - (square + t[:, None] * (board - square)), axis=1), 90) < 0.06
    assert 0 < own < 12


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_grayscale_stays_grayscale(family):
    img, donor = textured(2, grey=True), textured(3)  # even a colour donor must not bring colour in
    d = make_defect(img, np.random.default_rng(0), family, typical_area(family, 0.02), donor)
    assert d.mask.any()
    assert np.array_equal(d.image[..., 0], d.image[..., 1]) and np.array_equal(d.image[..., 0], d.image[..., 2])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_non_square_strips(family):
    img, donor = textured(4, (64, 512)), textured(5, (64, 400))  # a donor of another size is fine
    for seed, area in enumerate(LOGICAL_AREA if family == LOGICAL else (0.0005, 0.01, 0.1)):
        d = make_defect(img, np.random.default_rng(seed), family, area, donor)
        assert d.image.shape == img.shape and d.mask.any()
        assert np.array_equal(d.image[~d.mask], img[~d.mask])
        assert area / 4 <= d.area <= area * 3, (area, d.area)


def test_bad_arguments_are_refused():
    img = textured(0, (32, 32))
    with pytest.raises(ValueError, match="unknown defect family"):
        make_defect(img, np.random.default_rng(0), "dent", 0.01)
    with pytest.raises(ValueError, match="area"):
        make_defect(img, np.random.default_rng(0), "spot", 1.5)
    with pytest.raises(ValueError, match="H, W, 3"):
        make_defect(img[..., 0], np.random.default_rng(0), "spot", 0.01)
    with pytest.raises(ValueError, match="at least one"):
        synthesize([], 3)


def test_perlin_noise_is_smooth_bounded_and_any_shape():
    noise = perlin((37, 91), (3, 7), np.random.default_rng(0))
    assert noise.shape == (37, 91) and np.abs(noise).max() <= 1.5 and noise.std() > 0.1
    assert np.abs(np.diff(noise, axis=1)).max() < 0.5  # gradient noise, not white noise
    assert np.array_equal(noise, perlin((37, 91), (3, 7), np.random.default_rng(0)))


def test_gallery_writes_the_contact_sheet_each_defect_and_its_mask(tmp_path):
    paths = write_gallery([textured(0), textured(1, (64, 160))], tmp_path, n=7, tile=64)
    assert paths[0] == tmp_path / "gallery.png" and all(p.is_file() for p in paths) and len(paths) == 15
    assert {p.name for p in paths[1:]} == ({f"defect_{i:03d}_{f}.png" for i, f in enumerate(ALL_FAMILIES)}
                                           | {f"defect_{i:03d}_mask.png" for i in range(7)})
    mask = np.asarray(Image.open(tmp_path / "defect_002_mask.png"))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255} and mask.any()
    assert Image.open(paths[0]).size[0] > 4 * 64


def test_cli_synth_writes_a_gallery_of_the_training_images(tmp_path, capsys):
    category = make_synthetic_dataset(tmp_path, n_train=8, n_test_good=2, n_test_defect=2, size=64)
    out = tmp_path / "synth"
    assert main(["synth", str(category), "--out", str(out), "--n", "6", "--seed", "1", "--image-size", "48"]) == 0
    assert (out / "gallery.png").is_file() and len(list(out.glob("defect_*_mask.png"))) == 6
    assert Image.open(out / "defect_000_cutpaste.png").size == (48, 48)  # shrunk to --image-size
    assert "wrote 6 synthetic defects" in capsys.readouterr().out
    assert main(["synth", str(category), "--out", str(out), "--n", "0"]) == 2
