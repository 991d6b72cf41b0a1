"""Accuracy on real industrial data from ../shared (skipped cleanly when it is absent)."""

from __future__ import annotations

import pytest

from defectlens import create_detector, load_dataset
from defectlens.evaluation import evaluate

from .conftest import shared_category


@pytest.mark.slow
def test_patchcore_on_mvtec_bottle():
    ds = load_dataset(shared_category("mvtec_ad/bottle"), validation_fraction=0.1)
    bundle = create_detector("patchcore").fit(ds.train_good).calibrate(ds.validation)
    result = evaluate(bundle, ds)
    assert result.metrics["image_auroc"] >= 0.99
    assert result.metrics["pixel_auroc"] >= 0.97
    assert result.metrics["aupro"] >= 0.85
    assert result.metrics["false_rejects"] <= 1  # of 20 good test images
