"""The threshold benchmark: oracle recall, and one small category run end to end."""

from __future__ import annotations

import numpy as np
import pytest

from defectlens.threshold_benchmark import _run_category, markdown, oracle_recall, subsample


def test_oracle_recall_is_the_best_any_threshold_reaches_at_that_false_reject_rate():
    good = np.arange(1.0, 21.0)  # 20 good scores
    defect = np.array([19.5, 21.0, 25.0, 0.5])
    assert oracle_recall(good, defect, 0.0) == 0.5  # threshold 20: catches 21 and 25
    assert oracle_recall(good, defect, 0.05) == 0.75  # one good rejected: threshold 19 catches 19.5 too
    assert oracle_recall(good, defect, 1.0) == 1.0


def test_subsample_is_seeded_and_keeps_all_when_asked():
    paths = list(range(100))
    assert subsample(paths, 20, 1) == subsample(paths, 20, 1) and len(subsample(paths, 20, 1)) == 20
    assert subsample(paths, None, 1) == paths


def test_small_category_gives_every_rule_for_every_scheme(tiny_dataset):
    entry = _run_category(str(tiny_dataset), "discs", "patchcore", {"image_size": 64, "coreset_ratio": 0.1}, [8], 0)
    assert not entry.error, entry.error
    schemes = {r.scheme for r in entry.rows}
    assert schemes == {"kfold-5", "leave-one-out"}  # 10 folds of 8 images is leave-one-out
    assert sum(r.default for r in entry.rows) == 1
    for r in entry.rows:
        assert r.n_train == 8 and r.n_calibration == 8
        assert 0.0 <= r.frr <= 1.0 and 0.0 <= r.recall <= r.oracle_same + 1e-12
        if r.rule.startswith("conformal"):
            assert r.threshold == pytest.approx(r.largest_good) and r.bound == pytest.approx(1 / 9)
    text = markdown([entry], "test machine", "patchcore")
    assert "**default**" in text and "recall / oracle" in text
