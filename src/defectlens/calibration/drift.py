"""Drift watch: do the line's recent scores still look like the good parts the threshold was set on?

A threshold is honest about the images it was calibrated on; when the line moves (a new batch of
material, an ageing lamp, a shifted fixture) good parts score higher and false rejects climb long
before anyone looks at a chart. Two tests run over a rolling window of recent decision scores:

- a one-sided two-sample Kolmogorov-Smirnov test against the calibration's (unseen) good scores:
  have scores moved up? Defective parts in the window push it too, which is why the effect size
  (the KS statistic D, the largest gap between the two distributions) must also be large before
  the state turns to ``drift``: a window that holds a few real defects, or the same parts seen
  again and again, has a tiny p-value but a small D;
- a one-sided binomial test of the window's reject count against the false-reject rate the
  calibration promised: is the line rejecting more than the promise explains? On its own that
  could be a bad batch of real defects, so it raises a ``warning``, not ``drift``.

Scores that moved are ``drift`` only when the move breaks the threshold's promise: the
false-reject rate expected of parts like the window's (the same Gumbel tail model calibration
uses) is at least ``frr_factor`` times the promised one. Scores that moved up but stay far below
the threshold are a ``warning``: worth a look, not a reason to stop the line. On one real data set
(DeepPCB) the test split's good boards score visibly higher than the held-out training boards,
yet 0.4 % of them are rejected; calling that drift would cry wolf on every shift.

A line that moves at once fills a rolling window only slowly: after 30 moved parts, 70 of the 100
scores are still the old ones. So the same question is also asked of the most recent
``min_samples``, 2 x ``min_samples``, ... inspections (a scan over recent spans, as change
detectors such as ADWIN do), each KS test at ``alpha`` shared among the spans (Bonferroni). On a
short span the tail model is too noisy to decide whether the promise broke (on DeepPCB's good
test boards it cried wolf at 30 parts), so there the rejects themselves must show it: a binomial
test that the span rejects more than ``frr_factor`` times the promised rate, at ``recent_level``.
On the line-loop benchmark's moved streams (PatchCore) this cut the parts until ``drift`` from
48 to 25 on Magnetic Tile and from 44 to 28 on AITEX, with no false alarm in the unmoved streams
of 500 nor in streams with 10 % real defects mixed in. A burst of real defects as long as a short
span looks the same as a moved line, which the reason says.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from defectlens.calibration.strategies import gumbel_tail, robust_std
from defectlens.errors import DefectLensError

STATES = ("ok", "warning", "drift")


@dataclass(frozen=True)
class DriftSettings:
    window: int = 100  # recent inspections compared
    min_samples: int = 30  # fewer than this in the window: too early to judge, the state stays ok
    alpha: float = 1e-3  # significance for drift (and for the reject-rate warning)
    min_effect: float = 0.3  # KS statistic D needed for drift; half of it, at 10x alpha, for a warning
    frr_factor: float = 2.0  # moved scores are drift once they imply this many times the promised false-reject rate
    recent_level: float = 0.05  # on a recent span shorter than the window: significance of its reject count against that rate

    def __post_init__(self) -> None:
        if self.window < 2 or not 1 <= self.min_samples <= self.window:
            raise DefectLensError(f"drift window must be at least 2 and min samples between 1 and the window, got {self.window} / {self.min_samples}")
        if not 0 < self.alpha < 1 or not 0 < self.recent_level < 1 or not 0 < self.min_effect <= 1 or self.frr_factor < 1:
            raise DefectLensError(f"drift alpha and recent level must be in (0, 1), min effect in (0, 1] and the FRR factor at least 1, "
                                  f"got {self.alpha} / {self.recent_level} / {self.min_effect} / {self.frr_factor}")

    def spans(self, n: int) -> list[int]:
        """The recent spans judged besides the whole window of ``n``: min_samples, twice that, ..."""
        return list(range(self.min_samples, n, self.min_samples))


@dataclass
class DriftReport:
    state: str
    n: int  # scores in the window
    window: int
    ks_statistic: float | None
    ks_pvalue: float | None
    rejects: int
    reject_rate: float | None
    expected_frr: float
    binomial_pvalue: float | None
    median_shift: float | None  # window median minus good median, in good-score spreads
    implied_frr: float | None  # false-reject rate expected of parts like the window's (tail model)
    reasons: list[str]
    # drift seen in only the last ``span`` inspections: KS figures and median shift are then that span's, the rest the window's
    span: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DriftMonitor:
    """A rolling window of one model's decision scores, judged against its calibration."""

    def __init__(self, reference: Sequence[float], threshold: float, expected_frr: float, settings: DriftSettings | None = None) -> None:
        self.settings = settings or DriftSettings()
        self.reference = np.sort(np.asarray(reference, dtype=np.float64))
        self.threshold = float(threshold)
        self.expected_frr = float(min(max(expected_frr, 1e-6), 1.0))
        self._spread = max(robust_std(self.reference), 1e-12) if self.reference.size >= 2 else 1.0
        self._scores: deque[float] = deque(maxlen=self.settings.window)

    def add(self, score: float) -> None:
        if math.isfinite(score):
            self._scores.append(float(score))

    def extend(self, scores: Sequence[float]) -> None:
        for s in scores:
            self.add(s)

    def report(self) -> DriftReport:
        s = self.settings
        window = np.asarray(self._scores, dtype=np.float64)
        n = len(window)
        rejects = int((window > self.threshold).sum())
        empty = DriftReport("ok", n, s.window, None, None, rejects, rejects / n if n else None, self.expected_frr, None, None, None, [])
        if self.reference.size < 2:
            empty.reasons.append("the calibration keeps no good scores to compare with")
            return empty
        if n < s.min_samples:
            empty.reasons.append(f"collecting: {n} of {s.min_samples} inspections needed before judging")
            return empty
        # alternative "less": the window's CDF lies below the reference's, i.e. its scores are higher
        ks = stats.ks_2samp(window, self.reference, alternative="less", method="asymp")  # exact costs 10 ms a call
        binom = stats.binomtest(rejects, n, self.expected_frr, alternative="greater").pvalue
        shift = (float(np.median(window)) - float(np.median(self.reference))) / self._spread
        d, p = float(ks.statistic), float(ks.pvalue)
        implied = float(gumbel_tail(window, self.threshold))
        reasons = []
        state = "ok"
        if p < s.alpha and d >= s.min_effect:
            moved = f"scores moved up: KS D = {d:.2f} (p = {p:.1g}), median {shift:+.1f} good-score spreads"
            if implied >= s.frr_factor * self.expected_frr:
                state = "drift"
                reasons.append(f"{moved}; parts like these would be falsely rejected {100 * implied:.1f} % of the time, "
                               f"against the {100 * self.expected_frr:.1f} % promised")
            else:
                state = "warning"
                reasons.append(f"{moved}; the threshold still holds ({100 * implied:.2f} % false rejects expected)")
        elif p < 10 * s.alpha and d >= s.min_effect / 2:
            state = "warning"
            reasons.append(f"scores creeping up: KS D = {d:.2f} (p = {p:.1g})")
        if binom < s.alpha:
            state = "drift" if state == "drift" else "warning"
            reasons.append(f"{rejects} of {n} rejected, where the calibration expects {100 * self.expected_frr:.1f} % of good parts "
                           f"(p = {binom:.1g}): a shift, or a run of real defects")
        span = None
        if state != "drift" and (recent := self._recent_drift(window)) is not None:
            state, span, d, p, why = "drift", *recent
            shift = (float(np.median(window[-span:])) - float(np.median(self.reference))) / self._spread
            reasons.insert(0, why)
        return DriftReport(state, n, s.window, d, p, rejects, rejects / n, self.expected_frr, float(binom), shift, implied, reasons, span)

    def _recent_drift(self, window: np.ndarray) -> tuple[int, float, float, str] | None:
        """The shortest recent span whose scores moved up and whose rejects break the promise."""
        s = self.settings
        spans = s.spans(len(window))
        alpha = s.alpha / (len(spans) + 1)  # the whole window's test shares it too
        rate = min(1.0, s.frr_factor * self.expected_frr)
        for m in spans:
            recent = window[-m:]
            ks = stats.ks_2samp(recent, self.reference, alternative="less", method="asymp")
            if ks.pvalue >= alpha or ks.statistic < s.min_effect:
                continue
            rejects = int((recent > self.threshold).sum())
            if stats.binomtest(rejects, m, rate, alternative="greater").pvalue < s.recent_level:
                d, p = float(ks.statistic), float(ks.pvalue)
                return m, d, p, (f"the last {m} inspections moved up at once: KS D = {d:.2f} (p = {p:.1g}), and "
                           f"{rejects} of them were rejected, more than {100 * rate:.1f} % ({s.frr_factor:g}x the promise) explains: "
                           "the line moved, or a burst of real defects")
        return None


def expected_frr_of(calibration: Any) -> float:
    """The false-reject rate a calibration promised: its guarantee's bound, else its tail estimate."""
    guarantee = getattr(calibration, "guarantee", None) or {}
    if guarantee.get("bound") is not None:
        return float(guarantee["bound"])
    estimate = getattr(calibration, "expected_frr", None) or {}
    return float(estimate.get("expected", 0.01))


__all__ = ["STATES", "DriftMonitor", "DriftReport", "DriftSettings", "expected_frr_of"]
