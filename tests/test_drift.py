"""Drift watch: a moved line is flagged fast, the same good parts seen again and again never are."""

from __future__ import annotations

import numpy as np
import pytest

from defectlens.calibration.drift import DriftMonitor, DriftSettings
from defectlens.errors import DefectLensError


def monitor(seed: int = 0, **settings) -> tuple[DriftMonitor, np.random.Generator]:
    rng = np.random.default_rng(seed)
    reference = rng.normal(1.0, 0.1, 200)
    return DriftMonitor(reference, threshold=float(np.quantile(reference, 0.99)), expected_frr=0.01, settings=DriftSettings(**settings)), rng


@pytest.mark.parametrize("seed", range(5))
def test_a_cycled_good_stream_is_never_called_drift(seed):
    mon, rng = monitor(seed)
    parts = rng.normal(1.0, 0.1, 20)  # 20 good test parts, seen 25 times each
    states = []
    for i in range(500):
        mon.add(float(parts[i % 20]))
        states.append(mon.report().state)
    assert "drift" not in states


def test_a_moved_line_is_flagged_within_50_inspections():
    mon, rng = monitor(1)
    for v in rng.normal(1.0, 0.1, 100):
        mon.add(float(v))
    assert mon.report().state == "ok"
    flagged_at = None
    for i, v in enumerate(rng.normal(1.25, 0.1, 50), start=1):  # good parts 2.5 spreads higher: a brighter lamp
        mon.add(float(v))
        if mon.report().state == "drift":
            flagged_at = i
            break
    report = mon.report()
    assert report.state == "drift" and flagged_at is not None and flagged_at <= 50
    assert report.ks_statistic >= 0.3 and report.median_shift > 0 and report.reasons


def test_too_many_rejects_alone_is_a_warning_with_its_figures():
    mon, rng = monitor(2)
    scores = list(rng.normal(1.0, 0.1, 90)) + [5.0] * 10  # a run of real defects, good parts unchanged
    mon.extend(scores)
    report = mon.report()
    assert report.state == "warning" and report.rejects >= 10 and report.binomial_pvalue < 1e-3
    assert any("rejected" in r for r in report.reasons)


def test_too_early_to_judge_and_bad_settings():
    mon, _ = monitor(3, min_samples=30)
    mon.extend([9.0] * 29)
    assert mon.report().state == "ok" and "collecting" in mon.report().reasons[0]
    with pytest.raises(DefectLensError, match="window"):
        DriftSettings(window=10, min_samples=20)
    with pytest.raises(DefectLensError, match="alpha"):
        DriftSettings(alpha=0)


def test_scores_that_moved_but_stay_far_below_the_threshold_are_a_warning_not_drift():
    rng = np.random.default_rng(4)
    reference = rng.normal(1.0, 0.1, 200)
    mon = DriftMonitor(reference, threshold=2.0, expected_frr=0.01)  # a threshold far above every good score
    mon.extend(list(rng.normal(1.1, 0.1, 100)))  # moved a spread up: statistically clear, practically harmless
    report = mon.report()
    assert report.state == "warning" and report.ks_statistic >= 0.3 and report.implied_frr < 0.02
    assert "threshold still holds" in report.reasons[0]


def _moved_after(mon: DriftMonitor, rng: np.random.Generator, shift: float) -> int | None:
    mon.extend([float(v) for v in rng.normal(1.0, 0.1, 100)])
    for i, v in enumerate(rng.normal(1.0 + shift, 0.1, 100), start=1):
        mon.add(float(v))
        if mon.report().state == "drift":
            return i
    return None


def test_a_line_that_moves_at_once_is_seen_in_the_recent_inspections_before_it_fills_the_window():
    # 1.5 spreads up: about a fifth of good parts rejected, against the 1 % promised
    fast = [_moved_after(monitor(seed)[0], np.random.default_rng(100 + seed), 0.15) for seed in range(5)]
    whole = [_moved_after(monitor(seed, min_samples=100)[0], np.random.default_rng(100 + seed), 0.15) for seed in range(5)]
    assert all(f is not None and f <= 35 for f in fast), fast
    assert all(w is None or w > f for w, f in zip(whole, fast, strict=True)), (whole, fast)
    mon, rng = monitor(5)
    _moved_after(mon, rng, 0.15)
    report = mon.report()
    assert report.state == "drift" and report.span is not None and report.span < report.n
    assert "last" in report.reasons[0] and "burst of real defects" in report.reasons[0]
