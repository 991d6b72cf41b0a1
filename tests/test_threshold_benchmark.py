"""The threshold benchmark: oracle recall, and one small category run end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from defectlens.errors import DefectLensError
from defectlens.evaluation.threshold_benchmark import (
    CARRIED,
    VIEWS,
    _run_category,
    cross_conformal_rejects,
    extrapolate,
    markdown,
    oracle_recall,
    run_threshold_benchmark,
    subsample,
)


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


@pytest.mark.slow
def test_small_category_gives_every_rule_for_every_scheme(tiny_dataset):
    entry = _run_category(str(tiny_dataset), "discs", "patchcore", {"image_size": 64, "coreset_ratio": 0.1}, [8], 0)
    assert not entry.error, entry.error
    schemes = {r.scheme for r in entry.rows}
    assert schemes == {"kfold-5", "leave-one-out", CARRIED, VIEWS}  # 10 folds of 8 images is leave-one-out
    assert sum(r.default for r in entry.rows) == 1
    for r in entry.rows:
        assert r.n_train == 8 and r.n_calibration == (8 * 14 if r.scheme == VIEWS else 8)
        assert 0.0 <= r.frr <= 1.0 and 0.0 <= r.recall <= r.oracle_same + 1e-12
        if r.rule.startswith("conformal") and r.scheme != VIEWS:
            assert r.threshold == pytest.approx(r.largest_good) and r.bound == pytest.approx(1 / 9)
    (fold,) = entry.folds
    assert fold.folds == 8 and fold.probe_good + fold.probe_defect > 0 and fold.bias_median > 0
    for name in ("deployed", "extrapolated", "cross"):
        assert 0.0 <= getattr(fold, f"{name}_frr") <= 1.0
    text = markdown([entry], "test machine", "patchcore")
    assert "**default**" in text and "recall / oracle" in text and "cross-conformal" in text


@pytest.mark.slow
def test_auto_calibrates_each_sizes_pick_as_fit_does(tiny_dataset):
    from defectlens.workflows import Candidate

    pool = [Candidate("patchcore", "patchcore", {"image_size": 64, "coreset_ratio": 0.1}),
            Candidate("padim", "padim", {"image_size": 64, "n_features": 20})]
    entry = _run_category(str(tiny_dataset), "discs", "auto", {"pool": pool, "screen_images": 6, "final_images": 8}, [12], 0)
    assert not entry.error, entry.error
    assert {r.scheme for r in entry.rows} == {"kfold-10"} and not entry.folds  # only what fit does
    assert sum(r.default for r in entry.rows) == 1 and all(r.standard for r in entry.rows)
    assert len({r.pick for r in entry.rows}) == 1 and entry.rows[0].pick.split("+")[0] in {"patchcore", "padim"}  # maybe "+global"
    assert f"12 [{entry.rows[0].pick}]" in markdown([entry], "test machine", "auto")


@pytest.mark.slow
def test_repeated_draws_calibrate_as_fit_does_and_tabulate_the_spread(tiny_dataset):
    entry = _run_category(str(tiny_dataset), "discs", "padim", {"image_size": 64, "n_features": 20}, [8], 0, draws=3, group_by=r"^\d")
    assert not entry.error, entry.error
    default = [r for r in entry.rows if r.default]
    assert [r.draw for r in default] == [0, 1, 2] and {r.scheme for r in entry.rows} == {"kfold-8"} and not entry.folds
    assert len({r.threshold for r in default}) > 1  # each draw has its own folds, so its own threshold
    text = markdown([entry], "test machine", "padim")
    assert "over repeated draws" in text and "| 8 (draw 3) | kfold-8 (8) | conformal 2 % **default** |" in text
    for r in default:  # the test's good images are 000-003: one group, whose training images each draw counts
        assert list(r.groups) == ["0"] and r.groups["0"]["test_good"] == 4 and r.groups["0"]["frr"] == pytest.approx(r.frr)
    assert "per group of good test images" in text and "| discs | 8 (draw 2) |" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| discs | 8 |")]
    frr = [r.frr for r in default]
    assert f"| 3 | {100 * np.mean(frr):.1f} % | {100 * max(frr):.1f} % | {sum(f > 0.05 for f in frr)} |" in row


def test_extrapolation_recovers_scores_that_fall_as_one_over_training_size():
    n, a, b = 20, np.array([1.0, 2.0, 3.0]), np.array([4.0, 8.0, 2.0])
    at = lambda m: a + b / m  # noqa: E731
    assert extrapolate(at(n * 4 / 5), at(n * 9 / 10), n, 5, 10) == pytest.approx(at(n))


def test_cross_conformal_with_identical_fold_models_is_the_conformal_rule():
    held = np.arange(1.0, 20.0)  # 19 calibration scores over 3 folds
    folds = np.arange(19) % 3
    new = np.array([0.5, 18.5, 19.0, 25.0])
    rejected = cross_conformal_rejects(np.tile(new, (3, 1)), held, folds, 0.01)
    assert rejected.tolist() == [False, False, False, True]  # above the largest: floor(0.01 * 20) = 0, so rank 1
    rejected = cross_conformal_rejects(np.tile(new, (3, 1)), held, folds, 0.1)
    assert rejected.tolist() == [False, True, True, True]  # rank 2: reject above the second largest (18)


def test_draws_table_leaves_out_draws_no_threshold_could_catch_anything_in_as_the_summary_does():
    from defectlens.evaluation.threshold_benchmark import DEFAULT_RULE, CategoryThresholds, ThresholdRow, draws_table

    row = dict(category="c", n_train=20, scheme="kfold-10", rule=DEFAULT_RULE, n_calibration=20, default=True, standard=True)
    entry = CategoryThresholds("c", [ThresholdRow(**row, frr=0.0, recall=0.4, oracle_same=0.8, draw=0),
                                     ThresholdRow(**row, frr=0.1, recall=0.0, oracle_same=0.0, draw=1)])
    line = draws_table([entry]).splitlines()[-1]
    assert "| 2 | 5.0 % | 10.0 % | 1 | 0.50 (0.50) |" in line  # the second draw's 0 / 0 is no ratio, not 1.0


def test_group_by_gives_the_default_thresholds_false_reject_rate_per_group_of_good_test_images():
    """DeepPCB's good test boards are mostly of designs absent from training: per group, with the
    groups' training images counted, the split shows which rejects are parts the model never saw."""
    import re

    from defectlens.evaluation.threshold_benchmark import CategoryThresholds, ThresholdRow, group_of, group_rejects

    rows = [ThresholdRow("pcb", 3, "holdout", "conformal 1 %", threshold=1.0, default=True), ThresholdRow("pcb", 3, "holdout", "tail", threshold=1.0)]
    train = [Path("12000_1.png"), Path("12000_2.png"), Path("90100_3.png")]
    test = [Path("12000_a.png"), Path("12100_b.png"), Path("12100_c.png"), Path("12100_d.png"), Path("board.png")]
    group_rejects(rows, re.compile(r"^\d{5}"), train, test, np.array([0, 0, 0, 1, 0]), np.array([0.5, 2.0, 0.5, 3.0, 1.5]))
    assert rows[0].groups == {"(no match)": {"train": 0, "test_good": 1, "frr": 1.0}, "12000": {"train": 2, "test_good": 1, "frr": 0.0},
                              "12100": {"train": 0, "test_good": 2, "frr": 0.5}}
    assert not rows[1].groups  # the default rule only
    text = markdown([CategoryThresholds("pcb", rows)], "test machine", "padim")
    line = next(line for line in text.splitlines() if line.startswith("| pcb | 3 |"))
    assert "| 1, 0.0 % | 3, 66.7 % |" in line and "12100: 50.0 % (0 / 2)" in line, line
    assert group_of("x_12.png", re.compile(r"(a)?\d+")) == "12"  # an optional group that did not take part: the whole match
    with pytest.raises(DefectLensError, match="not a regular expression"):
        run_threshold_benchmark(".", group_by="(")


def test_resplit_pass_rate_is_the_chance_that_one_holdout_meets_the_acceptance():
    """Pooled held-out and test good scores split again at their sizes: with defects far above
    every good part recall always matches the oracle's, so a pass is test FRR <= 5 %, which the
    largest of 19 scores keeps with probability 1 - 0.95 ** 19 (Beta law of the largest)."""
    from defectlens.evaluation.threshold_benchmark import passes, resplit_pass

    rng = np.random.default_rng(1)
    good, defect = rng.uniform(size=1000), np.full(50, 10.0)
    rate, frr95 = resplit_pass(np.max, good[:19], good[19:], defect)
    assert rate == pytest.approx(1 - 0.95**19, abs=0.07) and 0.05 < frr95 < 0.3
    assert resplit_pass(np.max, good[:19], good[19:], defect) == (rate, frr95)  # seeded
    assert resplit_pass(lambda s: np.inf, good[:19], good[19:], defect)[0] == 0.0  # catches nothing the oracle catches
    assert resplit_pass(lambda s: 2.0, good[:19], good[19:], defect) == (1.0, 0.0)
    assert passes(0.05, 0.45, 0.5) and not passes(0.06, 0.5, 0.5) and not passes(0.0, 0.44, 0.5) and passes(0.0, 0.0, 0.0)


def test_only_holdout_rows_are_split_again_and_the_tables_show_their_pass_rate(monkeypatch):
    """Fold models' scores are not exchangeable with the deployed model's test scores, so only a
    holdout's rows get a pass rate; the summary says how many runs passed as drawn and the mean rate."""
    from defectlens.evaluation import threshold_benchmark
    from defectlens.evaluation.threshold_benchmark import CategoryThresholds, _rows, summary
    from defectlens.workflows.fitting import ScoredImages

    monkeypatch.setattr(threshold_benchmark, "RESPLITS", 20)  # each re-split calibrates every rule again

    rng = np.random.default_rng(2)
    held, test_good, defect = rng.normal(size=199), rng.normal(size=191), rng.normal(3.0, 1.0, size=100)
    scored = ScoredImages(held, held, np.zeros(199), np.zeros(199))
    holdout = _rows("c", 761, "holdout", scored, None, test_good, defect, True)
    folds = _rows("c", 761, "kfold-10", scored, None, test_good, defect, False)
    assert all(0.0 <= r.resplit_pass <= 1.0 and 0.0 <= r.resplit_frr95 <= 1.0 for r in holdout)
    assert all(r.resplit_pass is None for r in folds)
    default = next(r for r in holdout if r.default)
    assert default.threshold == pytest.approx(np.sort(held)[-4])  # 2 % of 199: the fourth largest
    text = summary([CategoryThresholds("c", holdout)])
    line = next(line for line in text.splitlines() if "**default**" in line)
    assert f"| {int(default.frr <= 0.05 and default.recall >= 0.9 * default.oracle_same)} of 1 | {default.resplit_pass:.2f} (1) |" in line, line
    assert "| - |" in markdown([CategoryThresholds("c", folds)], "test machine", "padim")  # no rate where none was measured


def test_the_benchmarks_default_rule_is_what_fit_does():
    from defectlens.calibration.settings import CalibrationSettings
    from defectlens.evaluation.threshold_benchmark import DEFAULT_RULE, RULES

    assert CalibrationSettings(**RULES[DEFAULT_RULE]) == CalibrationSettings()
