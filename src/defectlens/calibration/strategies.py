"""Threshold rules, as pure functions of scores, so each can be tested on made-up distributions.

Convention everywhere: a score strictly above the threshold is a defect.

Good-only rules see no defect at all, which is the usual case on a new line. The base rule is
conformal (split conformal prediction, Vovk et al. 2005; Angelopoulos & Bates 2021): with n
good scores from images the model never saw, the k-th largest as threshold rejects a new good
part with probability at most k/(n+1), whatever the score distribution, as long as the new
part is exchangeable with the calibration parts. It never extrapolates: with fewer images
than a target needs, the largest good score is the threshold and the promise is 1/(n+1), said
as such. The high-probability (PAC) version bounds the false-reject rate of this one threshold
with confidence 1 - delta instead of on average over calibration sets.

The Gumbel tail model (an image score is the maximum of many patch scores, and maxima follow an
extreme-value law) stays as an estimate of the false-reject rate at any threshold, and as the
``tail`` rule for those who want it; fitted to 5-20 points its quantile can land several times
above the largest good score, throwing away detection power, which is why it is not the base.

Labelled rules need at least one good and one defective score and are read off one sweep over
every distinct threshold (midpoints between adjacent scores), so each reported number is
exactly what that threshold does on the given images.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from defectlens.errors import DefectLensError

EULER_GAMMA = 0.5772156649015329
# With very few images the sample std is unreliable (zero for one image); floor it at this
# fraction of the mean so a single held-out image still gives a usable, conservative threshold.
STD_FLOOR_FRACTION = 0.05
BOOTSTRAP_ROUNDS = 1000


def robust_std(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return max(std, STD_FLOOR_FRACTION * abs(float(values.mean())), 1e-12)


def _gumbel_moments(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gumbel location and scale by the method of moments, along the last axis (vectorised for
    bootstrap resamples: one closed form instead of thousands of optimiser runs)."""
    mean = values.mean(axis=-1)
    n = values.shape[-1]
    std = values.std(axis=-1, ddof=1) if n > 1 else np.zeros_like(mean)
    std = np.maximum(std, STD_FLOOR_FRACTION * np.abs(mean) + 1e-12)
    scale = std * np.sqrt(6.0) / np.pi
    return mean - EULER_GAMMA * scale, scale


def gumbel_tail(values: np.ndarray, threshold: float) -> float:
    """Probability that a new good score exceeds ``threshold`` under the fitted Gumbel law."""
    loc, scale = _gumbel_moments(np.asarray(values, dtype=np.float64))
    return float(stats.gumbel_r.sf(threshold, loc=loc, scale=scale))


def threshold_tail(values: np.ndarray, target_frr: float) -> float:
    """Threshold at which the fitted tail model rejects a new good part with probability ``target_frr``.

    The larger of the Gumbel quantile and the empirical quantile: the model extrapolates the
    tail when there are few images, the data override it when the model's tail is too light.
    An estimate, not a guarantee (see the module docstring).
    """
    if not 0.0 < target_frr < 1.0:
        raise DefectLensError(f"target false-reject rate must be between 0 and 1, got {target_frr}")
    values = np.asarray(values, dtype=np.float64)
    loc, scale = _gumbel_moments(values)
    parametric = float(stats.gumbel_r.isf(target_frr, loc=loc, scale=scale))
    empirical = float(np.quantile(values, 1.0 - target_frr, method="higher"))
    return max(parametric, empirical)


@dataclass(frozen=True)
class Guarantee:
    """What a conformal threshold promises: P(new good part rejected) <= ``bound``.

    ``confidence`` None: in expectation over calibration sets (marginal); otherwise the bound
    holds for this calibration set with that probability (PAC). ``achievable`` False means the
    target needs ``images_needed`` images and the bound is the best these images give.
    """

    threshold: float
    rank: int  # the threshold is the rank-th largest calibration score
    n: int
    bound: float
    target: float
    confidence: float | None
    achievable: bool
    images_needed: int

    def to_dict(self) -> dict:
        return asdict(self)


def conformal_rank(n: int, alpha: float) -> int:
    """Largest k whose k-th largest score keeps the FRR <= alpha on average: floor(alpha (n + 1)); 0 if none."""
    return int(math.floor(alpha * (n + 1) + 1e-9))


def pac_rank(n: int, alpha: float, delta: float) -> int:
    """Largest k such that the k-th largest score keeps the FRR <= alpha with probability >= 1 - delta.

    The FRR of the k-th largest of n scores is Beta(k, n - k + 1) distributed, so the condition
    is P(Binomial(n, alpha) >= k) >= 1 - delta. 0 if no k qualifies.
    """
    ks = np.arange(1, n + 1)
    ok = _pac_holds(ks, n, alpha, delta)
    return int(ks[ok].max()) if ok.any() else 0


def _pac_holds(ranks: int | np.ndarray, n: int, alpha: float, delta: float) -> np.ndarray:
    """Whether the rank-th largest of n scores keeps the FRR <= alpha with probability >= 1 - delta."""
    return stats.binom.sf(np.asarray(ranks) - 1, n, alpha) >= 1.0 - delta - 1e-12


def frr_upper(rank: int, n: int, confidence: float) -> float:
    """The FRR that the rank-th largest of n scores, as threshold, stays under with ``confidence``
    over calibration sets: that FRR is Beta(rank, n - rank + 1) distributed. With 20 images and
    the largest as threshold, 4.8 % on average but up to 11 % at 90 %."""
    return float(_beta_upper(np.asarray(rank), n, confidence))


def frr_upper_by_rejects(n: int, confidence: float) -> list[float]:
    """``frr_upper`` for a threshold with 0, 1, ..., n of the n calibration scores above it (the
    dashboard's slider looks its threshold up here, for every rank in one call rather than n);
    with all n above nothing is promised."""
    return [float(v) for v in _beta_upper(np.arange(1, n + 1), n, confidence)] + [1.0]


def _beta_upper(ranks: np.ndarray, n: int, confidence: float) -> np.ndarray:
    return stats.beta.ppf(confidence, ranks, n - ranks + 1)


def images_needed(alpha: float, delta: float | None = None, rank: int = 1) -> int:
    """Fewest calibration images for which the target can be guaranteed at all with the
    ``rank``-th largest score as threshold (1: the largest; 2: the first size at which one
    unusual image no longer decides the threshold alone)."""
    if delta is None:
        return int(math.ceil(rank / alpha - 1.0 - 1e-9))

    low, high = rank - 1, max(rank, int(math.ceil(math.log(delta) / math.log1p(-alpha))))
    while not _pac_holds(rank, high, alpha, delta):  # holds from some n on: bracket, then bisect
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if _pac_holds(rank, mid, alpha, delta) else (mid, high)
    return high


def threshold_conformal(values: np.ndarray, alpha: float, confidence: float | None = None) -> Guarantee:
    """The conformal threshold for a target false-reject rate ``alpha`` (see the module docstring)."""
    if not 0.0 < alpha < 1.0:
        raise DefectLensError(f"target false-reject rate must be between 0 and 1, got {alpha}")
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise DefectLensError(f"confidence must be between 0 and 1, got {confidence}")
    values = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    n = values.size
    if n == 0:
        raise DefectLensError("a threshold needs at least one good score")
    k = conformal_rank(n, alpha) if confidence is None else pac_rank(n, alpha, 1.0 - confidence)
    achievable = k >= 1
    k = min(max(k, 1), n)
    # PAC: the FRR that the k-th largest stays under with the asked confidence
    bound = k / (n + 1) if confidence is None else frr_upper(k, n, confidence)
    needed = images_needed(alpha, None if confidence is None else 1.0 - confidence)
    return Guarantee(float(values[k - 1]), k, n, float(bound), alpha, confidence, achievable, needed)


def conformal_bound(values: np.ndarray, threshold: float) -> float:
    """Marginal FRR bound of any threshold set on these scores: (scores above it + 1) / (n + 1)."""
    values = np.asarray(values, dtype=np.float64)
    return min(1.0, (int((values > threshold).sum()) + 1) / (values.size + 1))


def threshold_cost(good: np.ndarray, synthetic: np.ndarray, escape_cost: float, defect_rate: float) -> float:
    """The good score that minimises the expected cost per part, counting an escape ``escape_cost`` false rejects.

    Candidates are the good scores themselves (each with its conformal FRR k/(n+1)); recall is
    estimated from synthetic defects, so the rule never sets a threshold above the largest good
    score, where the data say nothing of the FRR. Ties go to the higher threshold.
    """
    if escape_cost <= 0 or not 0.0 < defect_rate < 1.0:
        raise DefectLensError(f"escape cost must be > 0 and the defect rate in (0, 1), got {escape_cost} and {defect_rate}")
    good = np.sort(np.asarray(good, dtype=np.float64))[::-1]
    synthetic = np.asarray(synthetic, dtype=np.float64)
    if synthetic.size == 0:
        raise DefectLensError("the cost rule needs synthetic defect scores to estimate recall")
    frr = np.arange(1, good.size + 1) / (good.size + 1)
    miss = (synthetic[None, :] <= good[:, None]).mean(axis=1)
    cost = (1.0 - defect_rate) * frr + defect_rate * escape_cost * miss
    return float(good[int(np.flatnonzero(cost <= cost.min() + 1e-12)[0])])


def threshold_k_sigma(values: np.ndarray, k: float) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) + k * robust_std(values)


@dataclass(frozen=True)
class FrrEstimate:
    """False-reject rate expected on new good parts at one threshold, with a 95 % interval."""

    expected: float
    low: float
    high: float
    observed_rejects: int  # among the calibration images themselves
    n: int

    def to_dict(self) -> dict:
        return {"expected": self.expected, "ci95": [self.low, self.high], "observed_rejects": self.observed_rejects, "n": self.n}


def estimate_frr(values: np.ndarray, threshold: float, seed: int = 0) -> FrrEstimate:
    """Expected FRR from the Gumbel tail; the interval from a bootstrap of that fit, widened to
    the exact (Clopper-Pearson) binomial interval of the rejects actually observed, so it is
    never narrower than what the images alone can support."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    expected = gumbel_tail(values, threshold)
    rng = np.random.default_rng(seed)
    resamples = values[rng.integers(0, n, size=(BOOTSTRAP_ROUNDS, n))]
    loc, scale = _gumbel_moments(resamples)
    tails = stats.gumbel_r.sf(threshold, loc=loc, scale=scale)
    lo, hi = np.quantile(tails, [0.025, 0.975])
    rejects = int((values > threshold).sum())
    ci = stats.binomtest(rejects, n).proportion_ci(0.95, method="exact")
    return FrrEstimate(expected, float(min(lo, ci.low)), float(max(hi, ci.high)), rejects, n)


# -- labelled rules ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Sweep:
    """Confusion counts at every distinct threshold, ascending."""

    thresholds: np.ndarray
    false_rejects: np.ndarray  # good scored above the threshold
    escapes: np.ndarray  # defects scored at or below it
    n_good: int
    n_defect: int

    @property
    def caught(self) -> np.ndarray:
        return self.n_defect - self.escapes

    @property
    def recall(self) -> np.ndarray:
        return self.caught / self.n_defect

    @property
    def precision(self) -> np.ndarray:
        flagged = self.caught + self.false_rejects
        return np.divide(self.caught, flagged, out=np.ones(len(flagged)), where=flagged > 0)

    @property
    def f1(self) -> np.ndarray:
        p, r = self.precision, self.recall
        return np.divide(2 * p * r, p + r, out=np.zeros(len(p)), where=(p + r) > 0)


def sweep(good: np.ndarray, defect: np.ndarray) -> Sweep:
    good = np.sort(np.asarray(good, dtype=np.float64))
    defect = np.sort(np.asarray(defect, dtype=np.float64))
    if good.size == 0 or defect.size == 0:
        raise DefectLensError("labelled calibration needs at least one good and one defective image")
    values = np.unique(np.concatenate([good, defect]))
    gaps = np.diff(values) / 2.0
    margin = max(float(np.abs(values).max()) * 1e-6, 1e-9)
    thresholds = np.concatenate([[values[0] - margin], values[:-1] + gaps, [values[-1] + margin]])
    false_rejects = good.size - np.searchsorted(good, thresholds, side="right")
    escapes = np.searchsorted(defect, thresholds, side="right")
    return Sweep(thresholds, false_rejects, escapes, good.size, defect.size)


def threshold_f1(good: np.ndarray, defect: np.ndarray) -> float:
    """Best F1; among equal F1 the highest threshold, which rejects the fewest good parts."""
    s = sweep(good, defect)
    f1 = s.f1
    best = np.flatnonzero(f1 == f1.max())[-1]
    return float(s.thresholds[best])


def threshold_for_recall(good: np.ndarray, defect: np.ndarray, target_recall: float) -> float:
    """The highest threshold that still catches ``target_recall`` of the defects: every lower
    threshold reaches the same recall too, but rejects more good parts."""
    if not 0.0 < target_recall <= 1.0:
        raise DefectLensError(f"target recall must be in (0, 1], got {target_recall}")
    s = sweep(good, defect)
    ok = np.flatnonzero(s.recall >= target_recall - 1e-12)
    return float(s.thresholds[ok[-1]])


def threshold_zero_false_rejects(good: np.ndarray, defect: np.ndarray) -> float:
    """The lowest threshold that rejects no good image: it catches the most defects possible
    without a single false reject."""
    s = sweep(good, defect)
    return float(s.thresholds[np.flatnonzero(s.false_rejects == 0)[0]])


def confusion_at(good: np.ndarray, defect: np.ndarray, threshold: float) -> dict:
    good = np.asarray(good, dtype=np.float64)
    defect = np.asarray(defect, dtype=np.float64)
    false_rejects = int((good > threshold).sum())
    caught = int((defect > threshold).sum())
    flagged = caught + false_rejects
    return {
        "threshold": float(threshold),
        # None, not NaN, where undefined: the record is stored as strict JSON
        "precision": caught / flagged if flagged and defect.size else None,
        "recall": caught / defect.size if defect.size else None,
        "false_rejects": false_rejects,
        "escapes": int(defect.size - caught) if defect.size else None,
        "frr": false_rejects / good.size if good.size else None,
    }
