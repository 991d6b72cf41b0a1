"""Masks, regions, severity and the shape heuristic for defect types."""

from __future__ import annotations

import numpy as np
import pytest

from defectlens.calibration.calibrate import calibrate_scores
from defectlens.inference.inspection import find_regions, heuristic_type, make_mask, severity


def _map_with(shapes: list[tuple[slice, slice, float]], size: int = 100) -> np.ndarray:
    m = np.full((size, size), 0.1, np.float32)
    for ys, xs, v in shapes:
        m[ys, xs] = v
    return m


def test_regions_are_connected_components_with_boxes_and_scores():
    m = _map_with([(slice(10, 12), slice(5, 45), 0.9), (slice(60, 66), slice(60, 66), 0.5)])
    regions, labels = find_regions(m, make_mask(m, 0.3))
    assert [r.area_px for r in regions] == [80, 36]  # largest first
    scratch, spot = regions
    assert scratch.box == (5, 10, 45, 12) and scratch.max_score == pytest.approx(0.9) and scratch.area_pct == pytest.approx(0.8)
    assert scratch.elongation > 10 and spot.elongation == pytest.approx(1.0, abs=0.05)
    assert (labels == scratch.label).sum() == 80
    assert heuristic_type(scratch) == "scratch/crack-like" and heuristic_type(spot) == "spot/contamination-like"
    big = find_regions(m := _map_with([(slice(0, 40), slice(0, 40), 0.6)]), make_mask(m, 0.3))[0][0]
    assert heuristic_type(big) == "discoloration/deformation-like"


def test_no_mask_pixels_means_no_regions():
    m = np.zeros((20, 20), np.float32)
    assert find_regions(m, make_mask(m, 0.5))[0] == []


def test_otsu_mask_never_goes_below_the_calibrated_threshold():
    rng = np.random.default_rng(0)
    m = rng.normal(0.2, 0.01, (64, 64)).astype(np.float32)
    m[20:30, 20:30] = 0.8
    otsu = make_mask(m, 0.3, "otsu")
    assert otsu.sum() == 100 and np.array_equal(otsu, make_mask(m, 0.3))
    faint = rng.normal(0.2, 0.05, (64, 64)).astype(np.float32)  # only texture: Otsu alone would split it in half
    assert make_mask(faint, 0.5, "otsu").sum() == 0
    with pytest.raises(ValueError, match="mask method"):
        make_mask(m, 0.3, "magic")


def test_severity_grows_with_evidence_and_size():
    cal = calibrate_scores(np.linspace(1, 2, 30), np.linspace(0.2, 0.3, 30))
    weak = _map_with([(slice(10, 13), slice(10, 13), cal.pixel_threshold * 1.05)])
    strong = _map_with([(slice(10, 13), slice(10, 13), cal.pixel_threshold * 3)])
    large = _map_with([(slice(10, 40), slice(10, 40), cal.pixel_threshold * 3)])
    sev = [severity(find_regions(m, make_mask(m, cal.pixel_threshold))[0][0], cal) for m in (weak, strong, large)]
    assert 0 <= sev[0] < sev[1] < sev[2] <= 1
    assert sev[2] == pytest.approx(1.0)


def test_regions_match_scikit_image_regionprops_on_blotchy_maps():
    """The OpenCV/SciPy path must find what regionprops finds: same components, boxes, areas,
    scores and ellipse elongation, with the label image marking each region alike."""
    from scipy import ndimage
    from skimage import measure

    rng = np.random.default_rng(3)
    for shape in [(64, 64), (37, 91), (120, 45)]:
        m = ndimage.gaussian_filter(rng.random(shape), 2.0).astype(np.float32)
        mask = make_mask(m, float(np.quantile(m, 0.85)))
        regions, labels = find_regions(m, mask)
        reference = measure.regionprops(measure.label(mask, connectivity=2), intensity_image=m)
        assert len(regions) == len(reference) > 2
        by_box = {(p.bbox[1], p.bbox[0], p.bbox[3], p.bbox[2]): p for p in reference}
        for region in regions:
            p = by_box[region.box]
            assert region.area_px == p.area and region.max_score == pytest.approx(p.intensity_max)
            assert region.mean_score == pytest.approx(p.intensity_mean, rel=1e-5)
            assert region.elongation == pytest.approx(max(p.axis_major_length, 1.0) / max(p.axis_minor_length, 1.0), rel=1e-4)
            assert np.array_equal(labels == region.label, _at(labels.shape, p))


def _at(shape: tuple[int, int], prop) -> np.ndarray:
    """A regionprops region's pixels as a mask of the whole image."""
    out = np.zeros(shape, bool)
    out[tuple(prop.coords.T)] = True
    return out
