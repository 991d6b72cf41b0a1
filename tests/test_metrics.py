"""Every metric against values worked out by hand on small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from defectlens.metrics import aupro, f1_max, image_aupr, image_auroc, pixel_auroc

LABELS = np.array([0, 0, 1, 1])
SCORES = np.array([0.1, 0.4, 0.35, 0.8])


def test_image_auroc_by_hand():
    # positive-negative pairs ranked right: (0.35>0.1), (0.8>0.1), (0.8>0.4); wrong: 0.35<0.4
    assert image_auroc(LABELS, SCORES) == pytest.approx(3 / 4)


def test_image_aupr_by_hand():
    # ranked: 0.8(+) P=1 R=.5 ; 0.4(-) ; 0.35(+) P=2/3 R=1  ->  AP = .5*1 + .5*2/3
    assert image_aupr(LABELS, SCORES) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_f1_max_by_hand():
    # thr 0.35: P=2/3 R=1 -> F1=0.8 (best); thr 0.8: P=1 R=.5 -> 0.667
    f1, thr = f1_max(LABELS, SCORES)
    assert f1 == pytest.approx(0.8) and thr == pytest.approx(0.35)


def test_pixel_auroc_by_hand():
    masks = np.array([[[1, 0], [0, 0]]], dtype=bool)
    maps = np.array([[[0.5, 0.6], [0.2, 0.1]]])
    assert pixel_auroc(masks, maps) == pytest.approx(2 / 3)


def test_aupro_single_region_by_hand():
    # region pixels 0.9, 0.5; background 0.7, 0.3, 0.2, 0.1
    # curve (fpr, pro): (0, .5) -> (.25, .5) -> (.25, 1) -> ...; area to .3 = .25*.5 + .05*1
    masks = np.array([[[1, 1, 0, 0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.5, 0.7, 0.3, 0.2, 0.1]]])
    assert aupro(masks, maps) == pytest.approx(0.175 / 0.3)


def test_aupro_weights_regions_not_pixels():
    # a 1-pixel region found first (PRO 0.5 at FPR 0), a 3-pixel region only after one false pixel
    masks = np.zeros((2, 1, 4), dtype=bool)
    masks[0, 0, 0] = True
    masks[1, 0, :3] = True
    maps = np.zeros((2, 1, 4))
    maps[0, 0] = [0.9, 0.5, 0.0, 0.0]
    maps[1, 0] = [0.05, 0.05, 0.05, 0.0]
    # negatives: 0.5 and three zeros (n=4): curve (0,.5) -> (.25,.5) -> (.25,1); area to .3 = .25*.5 + .05*1
    # (weighting pixels instead of regions would give PRO .25 at first: (.25*.25 + .05) / .3 = .375)
    assert aupro(masks, maps) == pytest.approx((0.25 * 0.5 + 0.05 * 1.0) / 0.3)


def test_perfect_and_degenerate_cases():
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, :2, :2] = True
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert math.isnan(image_auroc(np.zeros(3), np.ones(3)))
    assert math.isnan(aupro(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2))))


def test_large_inputs_use_bounded_histograms_that_match_the_exact_metrics(monkeypatch):
    import defectlens.metrics as m

    rng = np.random.default_rng(3)
    masks = np.zeros((12, 64, 64), bool)
    for i in range(0, 12, 2):  # defects on half the images, of varied size
        y, x, r = rng.integers(8, 56, 2).tolist() + [int(rng.integers(2, 8))]
        masks[i, max(0, y - r):y + r, max(0, x - r):x + r] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks + 0.1 * rng.normal(size=masks.shape) * masks
    exact = (pixel_auroc(masks, maps), aupro(masks, maps))
    monkeypatch.setattr(m, "EXACT_PIXELS", 1000)  # force the histogram path
    binned = (pixel_auroc(masks, maps), aupro(masks, maps))
    assert binned == pytest.approx(exact, abs=1e-4)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
