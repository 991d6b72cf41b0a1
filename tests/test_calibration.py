"""Threshold rules on made-up score distributions whose answers are known."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

from defectlens.calibration import strategies as st
from defectlens.calibration.calibrate import calibrate_scores
from defectlens.calibration.record import Calibration
from defectlens.calibration.settings import CalibrationSettings
from defectlens.calibration.symmetry import asymmetry, choose_weight
from defectlens.errors import DefectLensError


@pytest.mark.parametrize("target", [0.01, 0.05])
def test_tail_rule_meets_its_target_with_many_images(target):
    rng = np.random.default_rng(1)
    calib = rng.gumbel(1.0, 0.1, 20_000)
    fresh = rng.gumbel(1.0, 0.1, 200_000)
    t = st.threshold_tail(calib, target)
    assert (fresh > t).mean() == pytest.approx(target, rel=0.15)


@pytest.mark.parametrize("family", ["gumbel", "normal", "lognormal"])
def test_tail_rule_stays_near_target_from_30_images(family):
    """Averaged over many small calibration sets, the real FRR stays close to the 1 % target,
    whatever the (unknown) shape of the good-score distribution."""
    rng = np.random.default_rng(2)
    draw = {"gumbel": lambda n: rng.gumbel(1, 0.1, n), "normal": lambda n: rng.normal(1, 0.1, n),
            "lognormal": lambda n: rng.lognormal(0, 0.3, n)}[family]
    frrs = [(draw(20_000) > st.threshold_tail(draw(30), 0.01)).mean() for _ in range(100)]
    assert np.mean(frrs) < 0.02


def test_frr_interval_covers_the_true_rate():
    rng = np.random.default_rng(3)
    covered = 0
    for i in range(100):
        calib = rng.gumbel(0, 1, 50)
        t = st.threshold_tail(calib, 0.02)
        true_rate = float(np.exp(-np.exp(-t)) * -1 + 1)  # Gumbel(0, 1) survival function
        est = st.estimate_frr(calib, t, seed=i)
        assert est.low <= est.expected <= est.high and est.n == 50
        covered += est.low <= true_rate <= est.high
    assert covered >= 90


def test_frr_interval_counts_observed_rejects():
    scores = np.r_[np.zeros(9), 10.0]
    est = st.estimate_frr(scores, 5.0)
    assert est.observed_rejects == 1
    # exact binomial interval of 1 reject in 10 contains 0.1 and reaches above 0.4
    assert est.low <= 0.1 <= est.high and est.high > 0.4


def test_k_sigma_is_mean_plus_k_std():
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert st.threshold_k_sigma(values, 2.0) == pytest.approx(3.0 + 2.0 * np.std(values, ddof=1))
    # one image: the std floor (5 % of the mean) keeps the threshold above the score
    assert st.threshold_k_sigma(np.array([2.0]), 3.0) == pytest.approx(2.3)


def test_bad_targets_are_refused():
    with pytest.raises(DefectLensError, match="between 0 and 1"):
        st.threshold_tail(np.ones(5), 0.0)
    with pytest.raises(DefectLensError, match="recall"):
        st.threshold_for_recall(np.ones(3), np.ones(3) * 2, 1.5)
    with pytest.raises(DefectLensError, match="unknown calibration strategy"):
        CalibrationSettings(strategy="magic")


GOOD = np.array([1.0, 2.0, 3.0])
DEFECT = np.array([2.5, 4.0, 5.0])


def test_labelled_rules_on_a_hand_worked_case():
    # values 1 2 2.5 3 4 5; defect if score > threshold
    assert st.threshold_zero_false_rejects(GOOD, DEFECT) == pytest.approx(3.5)  # catches 4 and 5, no good rejected
    assert st.threshold_for_recall(GOOD, DEFECT, 0.95) == pytest.approx(2.25)  # must catch 2.5: rejects the good 3
    assert st.threshold_for_recall(GOOD, DEFECT, 0.6) == pytest.approx(3.5)  # 2/3 suffices: highest such threshold
    assert st.threshold_f1(GOOD, DEFECT) == pytest.approx(2.25)  # P 3/4, R 1 -> F1 0.857 beats 0.8 at 3.5
    c = st.confusion_at(GOOD, DEFECT, 2.25)
    assert c == {"threshold": 2.25, "precision": 0.75, "recall": 1.0, "false_rejects": 1, "escapes": 0, "frr": pytest.approx(1 / 3)}


def test_labelled_rules_with_perfect_separation():
    good, defect = np.array([0.1, 0.2]), np.array([0.8, 0.9])
    for rule in (st.threshold_f1, st.threshold_zero_false_rejects):
        t = rule(good, defect)
        assert 0.2 < t < 0.8
    assert st.threshold_for_recall(good, defect, 1.0) == pytest.approx(0.5)


def test_calibrate_scores_builds_the_threshold_table():
    rng = np.random.default_rng(4)
    good = rng.normal(1.0, 0.1, 200)
    defect = rng.normal(2.0, 0.3, 40)
    types = ["crack"] * 20 + ["spot"] * 20
    cal = calibrate_scores(good, good * 0.8, CalibrationSettings(strategy="f1"), defect_scores=defect, defect_types=types)
    keys = [r["key"] for r in cal.table]
    assert keys == ["target_frr", "tail", "k_sigma", "f1", "target_recall", "zero_false_rejects"]
    chosen = [r for r in cal.table if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["key"] == "f1" and chosen[0]["threshold"] == cal.image_threshold
    zero = next(r for r in cal.table if r["key"] == "zero_false_rejects")
    assert zero["false_rejects"] == 0 and zero["threshold"] > good.max()
    assert set(cal.per_type) == {"crack", "spot"} and cal.per_type["crack"]["n"] == 20
    assert cal.n_good == 200 and cal.n_defect == 40 and cal.source == "holdout"
    assert "F1-max" in cal.describe()


def test_labelled_strategy_without_defects_says_what_to_do():
    with pytest.raises(DefectLensError, match="needs labelled defect images"):
        calibrate_scores(np.ones(20), np.ones(20), CalibrationSettings(strategy="target_recall"))


def test_few_images_warn_but_work():
    with pytest.warns(UserWarning, match="3 good images"):
        cal = calibrate_scores(np.array([1.0, 1.1, 0.9]), np.array([0.5, 0.6, 0.4]))
    # three images cannot promise 2 %: the largest good score is the threshold, and the record says what it promises
    assert cal.image_threshold == 1.1 and cal.pixel_threshold == 0.6
    assert cal.guarantee["bound"] == pytest.approx(0.25) and not cal.guarantee["achievable"] and cal.guarantee["images_needed"] == 49
    assert "3 images: FRR <= 25 % guaranteed on average" in cal.describe() and "needs >= 49 images" in cal.describe()


def test_normalised_score_is_one_half_at_the_threshold():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = calibrate_scores(np.linspace(1, 2, 50), np.linspace(0.5, 1, 50))
    t = cal.image_threshold
    assert cal.normalise(t) == pytest.approx(0.5)
    values = cal.normalise(np.array([t - 10, t - 0.1, t, t + 0.1, t + 10]))
    assert np.all(np.diff(values) > 0) and values[0] < 0.01 and values[-1] > 0.99
    assert cal.confidence(t) == pytest.approx(0.0) and cal.confidence(t + 10) > 0.99
    assert cal.normalise_map(np.full((2, 2), cal.pixel_threshold, np.float32)) == pytest.approx(0.5)


def test_record_round_trips_and_reads_old_records():
    cal = calibrate_scores(np.linspace(1, 2, 20), np.linspace(0.5, 1, 20))
    assert Calibration.from_dict(cal.to_dict()) == cal
    old = Calibration.from_dict({"image_threshold": 2.0, "pixel_threshold": 1.0, "method": "good_only_mean_k_sigma",
                                 "n_images": 3, "k_sigma": 3.0, "good_image_scores": [1.0, 1.2, 1.1]})
    assert old.strategy == "k_sigma" and old.normalise(2.0) == pytest.approx(0.5)
    with pytest.raises(DefectLensError, match="does not know: bogus"):
        Calibration.from_dict({**cal.to_dict(), "bogus": 1})


def test_symmetry_is_used_only_when_it_helps():
    maps = np.zeros((2, 8, 8))
    maps[1, 2, 1] = 1.0  # evidence on the left only
    assert list(asymmetry(maps, "lr")) == [0.0, 1.0]
    assert list(asymmetry(maps, "tb")) == [0.0, 1.0]
    rng = np.random.default_rng(5)
    good_s, defect_s = rng.normal(1, 0.1, 50), rng.normal(1, 0.1, 50)  # appearance cannot tell them apart
    helpful = choose_weight(good_s, rng.normal(0, 0.1, 50), defect_s, rng.normal(1, 0.1, 50))
    assert helpful["used"] and helpful["auroc_combined"] > helpful["auroc_appearance"] + 0.2
    same = rng.normal(0, 0.1, 100)
    useless = choose_weight(np.linspace(0, 1, 50), same[:50], np.linspace(2, 3, 50), same[50:])
    assert not useless["used"] and useless["auroc_appearance"] == 1.0


# -- conformal thresholds: the guarantee checked by simulation ----------------------------------

DISTRIBUTIONS = {
    "gumbel": (lambda rng, n: rng.gumbel(1, 0.1, n), lambda t: stats.gumbel_r.sf(t, 1, 0.1)),
    "normal": (lambda rng, n: rng.normal(1, 0.1, n), lambda t: stats.norm.sf(t, 1, 0.1)),
    "lognormal": (lambda rng, n: rng.lognormal(0, 0.5, n), lambda t: stats.lognorm.sf(t, 0.5)),
    "pareto": (lambda rng, n: rng.pareto(2.0, n) + 1, lambda t: stats.pareto.sf(t, 2.0)),  # a heavy tail no Gumbel fits
}


@pytest.mark.parametrize("family", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize(("n", "alpha"), [(20, 0.05), (50, 0.05), (200, 0.01), (199, 0.1)])
def test_conformal_frr_is_at_most_its_bound_on_average(family, n, alpha):
    """Over 1,000 calibration sets, the true FRR of the conformal threshold averages at most
    k/(n+1), and no less either (the bound is tight for continuous scores)."""
    draw, sf = DISTRIBUTIONS[family]
    rng = np.random.default_rng(7)
    frr, bounds = [], set()
    for _ in range(1000):
        g = st.threshold_conformal(draw(rng, n), alpha)
        frr.append(float(sf(g.threshold)))
        bounds.add(g.bound)
    (bound,) = bounds
    assert bound <= alpha
    tolerance = 3 * np.std(frr) / np.sqrt(len(frr))
    assert np.mean(frr) <= bound + tolerance
    assert np.mean(frr) >= bound - tolerance


@pytest.mark.parametrize("family", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize(("n", "alpha", "confidence"), [(100, 0.05, 0.9), (300, 0.01, 0.8)])
def test_pac_threshold_holds_at_its_confidence(family, n, alpha, confidence):
    draw, sf = DISTRIBUTIONS[family]
    rng = np.random.default_rng(8)
    guarantees = [st.threshold_conformal(draw(rng, n), alpha, confidence) for _ in range(1000)]
    assert all(g.achievable for g in guarantees)
    exceeded = np.mean([sf(g.threshold) > alpha for g in guarantees])
    assert exceeded <= (1 - confidence) + 3 * np.sqrt(confidence * (1 - confidence) / 1000)
    # and it is stricter than the on-average threshold from the same scores
    assert guarantees[0].rank <= st.conformal_rank(n, alpha)


@pytest.mark.parametrize("family", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize(("n", "alpha"), [(20, 0.01), (200, 0.01)])
def test_the_stated_spread_of_one_calibration_set_holds_at_its_confidence(family, n, alpha):
    """fit says how far one set's FRR may stray from the average: over 1,000 sets, the true FRR
    of the conformal threshold exceeds frr_upper(rank, n, 0.9) in about 10 % of them."""
    draw, sf = DISTRIBUTIONS[family]
    rng = np.random.default_rng(9)
    guarantees = [st.threshold_conformal(draw(rng, n), alpha) for _ in range(1000)]
    exceeded = np.mean([sf(g.threshold) > st.frr_upper(g.rank, g.n, 0.9) for g in guarantees])
    assert abs(exceeded - 0.1) <= 3 * np.sqrt(0.9 * 0.1 / 1000)


def test_conformal_rank_and_images_needed():
    assert st.conformal_rank(99, 0.01) == 1 and st.conformal_rank(98, 0.01) == 0
    assert st.images_needed(0.01) == 99 and st.images_needed(0.05) == 19
    assert st.images_needed(0.05, delta=0.1) == 45  # 0.95 ** 45 < 0.1 <= 0.95 ** 44
    assert st.pac_rank(44, 0.05, 0.1) == 0 and st.pac_rank(45, 0.05, 0.1) == 1
    # from how many images the second largest score is the threshold: one image no longer sets it alone
    assert st.images_needed(0.01, rank=2) == 199 and st.conformal_rank(199, 0.01) == 2 and st.conformal_rank(198, 0.01) == 1
    assert st.images_needed(0.05, delta=0.1, rank=2) == 77 and st.pac_rank(76, 0.05, 0.1) == 1 and st.pac_rank(77, 0.05, 0.1) == 2
    values = np.arange(1.0, 201.0)  # 200 scores: 1 % of 201 -> the 2nd largest
    g = st.threshold_conformal(values, 0.01)
    assert g.threshold == 199.0 and g.rank == 2 and g.bound == pytest.approx(2 / 201) and g.achievable


def test_too_few_images_give_the_largest_score_and_say_so():
    g = st.threshold_conformal(np.linspace(1, 2, 21), 0.01)
    assert g.threshold == 2.0 and g.bound == pytest.approx(1 / 22) and not g.achievable and g.images_needed == 99
    cal = calibrate_scores(np.linspace(1, 2, 21), np.linspace(1, 2, 21))
    assert "21 images: FRR <= 4.5 % guaranteed on average" in cal.describe()
    assert "<= 10 % for this calibration set with 90 % confidence" in cal.describe()  # 1 - 0.1 ** (1 / 21)
    assert "the 2 % target needs >= 49 images" in cal.describe()
    one_percent = calibrate_scores(np.linspace(1, 2, 21), np.linspace(1, 2, 21), CalibrationSettings(target_frr=0.01))
    assert "the 1 % target needs >= 99 images" in one_percent.describe()


def test_a_target_met_by_the_largest_score_alone_says_from_how_many_images_a_lower_one_keeps_it():
    """From 49 to 98 images the 2 % target is met, but only by the largest score: one image sets the
    threshold, and the user is told the images' number is what keeps it there."""
    text = calibrate_scores(np.linspace(1, 2, 50), np.linspace(1, 2, 50)).describe()
    assert "50 images: FRR <= 2 % guaranteed on average" in text and "needs >= 49" not in text
    assert "only the largest score meets the 2 % target, so one image sets the threshold: a lower one needs >= 99 images" in text
    pac = calibrate_scores(np.linspace(1, 2, 50), np.linspace(1, 2, 50), CalibrationSettings(target_frr=0.05, confidence=0.9))
    assert "a lower one needs >= 77 images" in pac.describe()  # the second largest keeps 5 % at 90 % from 77 images
    assert "only the largest" not in calibrate_scores(np.linspace(1, 2, 99), np.linspace(1, 2, 99)).describe()  # the second largest
    outlier = calibrate_scores(np.r_[np.linspace(1.0, 1.2, 49), 3.0], np.linspace(1, 2, 50))
    assert any("set by one calibration image" in n and "no longer sets" not in n for n in outlier.notes), outlier.notes  # said once


def test_tail_rule_beyond_the_largest_score_says_so():
    rng = np.random.default_rng(9)
    good = rng.gumbel(1, 0.1, 20)
    cal = calibrate_scores(good, good, CalibrationSettings(strategy="tail", target_frr=0.01))
    assert cal.image_threshold > good.max()
    assert any("above the largest good score" in n for n in cal.notes) and "note:" in cal.describe()
    assert not calibrate_scores(good, good).notes  # the conformal threshold never leaves the data


def test_cost_rule_trades_false_rejects_for_escapes():
    good = np.arange(1.0, 21.0)  # 20 good scores 1..20
    synthetic = np.r_[np.full(50, 19.5), np.full(50, 30.0)]  # half just under the largest good score
    # escapes cheap: keep the largest good score (FRR 1/21), miss half
    assert st.threshold_cost(good, synthetic, escape_cost=0.1, defect_rate=0.05) == 20.0
    # escapes dear: go down to the 2nd largest (FRR 2/21) and catch them all
    assert st.threshold_cost(good, synthetic, escape_cost=10, defect_rate=0.05) == 19.0
    cal = calibrate_scores(good, good, CalibrationSettings(strategy="cost"), synthetic_scores=synthetic)
    assert cal.image_threshold == 19.0 and cal.guarantee["bound"] == pytest.approx(2 / 21)
    row = next(r for r in cal.table if r["key"] == "cost")
    assert row["synthetic_recall"] == 1.0 and row["chosen"]
    with pytest.raises(DefectLensError, match="synthetic"):
        calibrate_scores(good, good, CalibrationSettings(strategy="cost"))


def test_tradeoff_table_lowers_the_threshold_step_by_step():
    rng = np.random.default_rng(10)
    good, synthetic = rng.normal(1, 0.1, 100), rng.normal(1.3, 0.2, 64)
    cal = calibrate_scores(good, good, synthetic_scores=synthetic, synthetic_families=["spot"] * 64)
    rows = cal.tradeoff
    assert rows[0]["threshold"] == good.max() and sum(r["chosen"] for r in rows) == 1
    assert np.all(np.diff([r["threshold"] for r in rows]) < 0)
    for key in ("guaranteed_frr", "synthetic_recall"):
        assert np.all(np.diff([r[key] for r in rows]) >= 0)
    text = cal.describe()
    assert "trade-off (64 synthetic defects; their recall is an estimate" in text
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_one_outlying_calibration_image_is_named():
    good = np.r_[np.linspace(1.0, 1.2, 29), 3.0]
    files = [f"good_{i:02d}.png" for i in range(30)]
    cal = calibrate_scores(good, good, files=files)
    assert cal.image_threshold == 3.0
    assert any("set by one calibration image (good_29.png)" in n for n in cal.notes)
    # at 2 % the largest of 30..98 images is the threshold: more images help only from 99 on (2.5 %: from 79)
    assert any("from 99 calibration images on, one image no longer sets the threshold alone" in n for n in cal.notes)
    looser = calibrate_scores(good, good, CalibrationSettings(target_frr=0.025), files=files).notes
    assert any("from 79 calibration images on" in n for n in looser), looser
    assert not calibrate_scores(np.linspace(1.0, 1.2, 30), np.linspace(1.0, 1.2, 30)).notes
    # with synthetic defects the note prices the image: what the next good score as threshold would catch and promise
    synthetic = np.r_[np.full(6, 2.0), np.full(2, 4.0)]
    priced = calibrate_scores(good, good, files=files, synthetic_scores=synthetic).notes
    assert any("at the next good score (1.2) an estimated 100 % of synthetic defects would be caught instead of 25 %, "
               "with FRR <= 6.5 % guaranteed instead of 3.2 %" in n for n in priced), priced
    # labelled defects' files follow the good ones; the good image is still the one named
    labelled = calibrate_scores(good, good, files=files + ["bad.png"], defect_scores=np.array([5.0]),
                                settings=CalibrationSettings()).notes
    assert any("(good_29.png)" in n for n in labelled), labelled


def test_a_few_calibration_images_far_above_the_rest_are_named():
    # MVTec bottle's 30 held-out scores under the demo's PaDiM: the top two decide the threshold,
    # though neither stands 3 spreads above the other
    good = np.array([137.7, 110.9, 72.5, 55.2, 52.9, 42.4, 40.3, 39.8, 35.3, 35.3, 34.7, 32.9, 32.4, 29.9, 27.8,
                     27.2, 27.1, 25.9, 25.2, 25.1, 25.0, 22.7, 22.5, 22.0, 19.7, 19.3, 19.1, 18.5, 17.9, 15.9])
    files = [f"good_{i:02d}.png" for i in range(30)]
    notes = calibrate_scores(good, good, files=files).notes
    assert any("set by 2 calibration images (good_00.png, good_01.png) scoring 137.7, 110.9" in n for n in notes), notes
    rng = np.random.default_rng(0)
    quiet = sum(bool(calibrate_scores(s, s).notes) for s in rng.gumbel(1.0, 0.1, (200, 30)))
    assert quiet <= 20  # on Gumbel scores, as image maxima are, the two rules speak up in about 6 sets in a hundred


def test_from_199_images_the_two_images_that_set_a_1_percent_threshold_are_named():
    rng = np.random.default_rng(1)
    good = np.r_[3.0, 2.8, rng.normal(1.0, 0.1, 197)]
    files = [f"good_{i:03d}.png" for i in range(199)]
    one_percent = CalibrationSettings(target_frr=0.01)
    cal = calibrate_scores(good, good, one_percent, files=files, synthetic_scores=np.r_[np.full(6, 2.0), np.full(2, 2.9)])
    assert cal.guarantee["rank"] == 2 and cal.image_threshold == 2.8
    note = next(n for n in cal.notes if "set by 2 calibration images (good_000.png, good_001.png)" in n)
    assert "would be caught instead of 25 %, with FRR <= 1.5 % guaranteed instead of 1.0 %" in note, note
    assert "no longer sets the threshold alone" not in note  # it no longer does
    quiet = sum(bool(calibrate_scores(s, s, one_percent).notes) for s in rng.gumbel(1.0, 0.1, (100, 199)))
    assert quiet <= 3  # on Gumbel scores the second largest stands apart far more rarely than the largest


def test_the_decision_rule_is_one_expression_for_numpy_and_torch():
    import torch
    from scipy.special import expit

    from defectlens.calibration.record import DecisionRule

    rule = DecisionRule(1.25, 0.1)
    scores = np.array([-1e6, 0.0, 1.2, 1.25, 1.2500001, 1.3, 1e6])
    assert rule.rejects(scores).tolist() == [False, False, False, False, True, True, True]  # on the threshold passes
    assert rule.rejects(torch.tensor(scores)).tolist() == rule.rejects(scores).tolist()
    np.testing.assert_allclose(rule.normalise(scores), expit((scores - 1.25) / 0.1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(rule.normalise(torch.tensor(scores), torch).numpy(), rule.normalise(scores), rtol=0, atol=1e-12)
    maps = np.random.default_rng(0).random((3, 8, 8))
    sym = DecisionRule(1.25, 0.1, 0.5, "lr")
    np.testing.assert_allclose(sym.combine(np.ones(3), maps), 1 + 0.5 * np.abs(maps - maps[:, :, ::-1]).max(axis=(1, 2)))
    np.testing.assert_allclose(sym.combine(torch.ones(3, dtype=torch.float64), torch.tensor(maps)).numpy(), sym.combine(np.ones(3), maps))
    assert rule.combine(scores, maps) is scores  # no symmetry term chosen: the appearance score
