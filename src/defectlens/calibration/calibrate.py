"""Choose thresholds from scores: good-only or labelled rules, and the table of what each costs."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

from defectlens.calibration import strategies as st
from defectlens.calibration.record import Calibration
from defectlens.calibration.settings import LABELLED, CalibrationSettings
from defectlens.errors import DefectLensError

MIN_RECOMMENDED_IMAGES = 10
TRADEOFF_ROWS = 8


def pixel_threshold_for(good_map_max: np.ndarray, settings: CalibrationSettings) -> float:
    """The pixel threshold always comes from good images: other rules pick the image threshold,
    but masks must stay clean on good parts whatever rule was chosen, so a good image shows a
    mask pixel about as rarely as it is falsely rejected."""
    values = np.asarray(good_map_max, dtype=np.float64)
    if settings.strategy == "k_sigma":
        return st.threshold_k_sigma(values, settings.k_sigma)
    if settings.strategy == "tail":
        return st.threshold_tail(values, settings.target_frr)
    return st.threshold_conformal(values, settings.target_frr, settings.confidence).threshold


def _labelled_thresholds(good: np.ndarray, defect: np.ndarray, settings: CalibrationSettings) -> dict[str, tuple[str, float]]:
    return {
        "f1": ("F1-max", st.threshold_f1(good, defect)),
        "target_recall": (f"recall >= {100 * settings.target_recall:g} %", st.threshold_for_recall(good, defect, settings.target_recall)),
        "zero_false_rejects": ("zero false rejects", st.threshold_zero_false_rejects(good, defect)),
    }


def _good_only_thresholds(good: np.ndarray, synthetic: np.ndarray, settings: CalibrationSettings) -> dict[str, tuple[str, float]]:
    conformal = st.threshold_conformal(good, settings.target_frr, settings.confidence)
    kind = "" if settings.confidence is None else f" at {100 * settings.confidence:g} % confidence"
    rules = {
        "target_frr": (f"conformal FRR {100 * settings.target_frr:g} %{kind}", conformal.threshold),
        "tail": (f"tail model FRR {100 * settings.target_frr:g} %", st.threshold_tail(good, settings.target_frr)),
        "k_sigma": (f"mean + {settings.k_sigma:g} sigma", st.threshold_k_sigma(good, settings.k_sigma)),
    }
    if synthetic.size:
        rules["cost"] = (f"cost (escape = {settings.escape_cost:g} FR)", st.threshold_cost(good, synthetic, settings.escape_cost, settings.defect_rate))
    return rules


def _recall(scores: np.ndarray, threshold: float) -> float | None:
    return float((scores > threshold).mean()) if scores.size else None


def tradeoff(good: np.ndarray, synthetic: np.ndarray, chosen: float, rows: int = TRADEOFF_ROWS) -> list[dict]:
    """What lowering the threshold buys: at the largest good scores (each a conformal
    threshold), the guaranteed and estimated FRR and the recall on synthetic defects."""
    ranked = np.sort(good)[::-1]
    ks = np.unique(np.r_[np.geomspace(1, max(1, ranked.size // 5), rows).round().astype(int), [1]])
    thresholds = sorted({float(ranked[k - 1]) for k in ks} | {float(chosen)}, reverse=True)
    return [{"threshold": t, "guaranteed_frr": st.conformal_bound(good, t), "estimated_frr": st.gumbel_tail(good, t),
             "synthetic_recall": _recall(synthetic, t), "chosen": t == chosen} for t in thresholds]


OUTLIER_SPREADS = 3.0
# A good score this many robust spreads (the MAD scaled to a normal's sigma) above the median stands apart from the bulk:
# image scores are maxima with a long right tail, and of 2,000 sets of 30 Gumbel draws this rule
# (beyond the one above) spoke up on 8.6 % at 5 spreads, 2.7 % at 6 and 1.2 % at 7.
FAR_SPREADS = 7.0
FAR_AT_MOST = 3  # more than this many far out is a heavy tail, not a few unusual images


def _outlier_note(good: np.ndarray, threshold: float, files: Sequence[str], synthetic: np.ndarray, shared_from: int | None = None) -> list[str]:
    """When the good score that sets the threshold (the largest, or from 99 images on at 2 % the
    second largest) stands far above the rest, alone or with one or two others, a few unusual
    calibration images decide how much the detector may catch: say which (MVTec bottle's 30
    held-out images under PaDiM: 138 and 111 against a median of 27, 9.5 and 7.2 robust spreads
    above it), and what they cost: this is where a threshold gives up recall, and the user can
    only judge it with the price beside it. ``shared_from``: the number of calibration images
    from which the target's threshold is the second largest score (99 for 2 %, 199 for 1 %)."""
    order = np.argsort(good)[::-1]
    rank = int((good >= threshold).sum())  # the threshold is the rank-th largest good score
    if good.size < 5 or not 1 <= rank <= FAR_AT_MOST or rank >= good.size or threshold != good[order[rank - 1]]:
        return []

    def named(idx: np.ndarray) -> str:
        return f" ({', '.join(files[i] for i in idx)})" if len(files) == good.size else ""

    gap = (threshold - good[order[rank]]) / st.robust_std(good[order[rank:]])
    if gap >= OUTLIER_SPREADS:
        who, it, fair = ("one calibration image", "it", "it is a fair good part") if rank == 1 else (
            f"{rank} calibration images", "them", "they are fair good parts")
        return [f"the threshold is set by {who}{named(order[:rank])} scoring {gap:.1f} spreads of the other good "
                f"scores above the next{_price(good, order, synthetic, rank, threshold)}: if {fair} the threshold is right; "
                f"if not, remove {it} and re-calibrate, or add good images"
                + (f" (from {shared_from} calibration images on, one image no longer sets the threshold alone)"
                   if rank == 1 and shared_from and shared_from > good.size else "")]
    median = float(np.median(good))
    spread = max(float(stats.median_abs_deviation(good, scale="normal")), 1e-12)
    far = order[: int((good > median + FAR_SPREADS * spread).sum())]
    if not rank <= far.size <= FAR_AT_MOST:
        return []
    scores = ", ".join(f"{good[i]:.4g}" for i in far)
    return [f"the threshold is set by {far.size} calibration image{'s' if far.size > 1 else ''}{named(far)} scoring {scores} "
            f"against a median of {median:.4g} ({FAR_SPREADS:g}+ robust spreads above it){_price(good, order, synthetic, far.size, threshold)}: "
            "if they are fair good parts the threshold is right, and defects scoring below them are let through; if not, "
            "remove them and re-calibrate, or add good images"]


def _price(good: np.ndarray, order: np.ndarray, synthetic: np.ndarray, above: int, threshold: float) -> str:
    """What the ``above`` largest good scores cost (``order`` ranks the good scores, largest
    first): the synthetic recall and the guarantee with the threshold at the next good score instead."""
    if not synthetic.size or above >= good.size:
        return ""
    below = float(good[order[above]])
    return (f"; at the next good score ({below:.4g}) an estimated {100 * _recall(synthetic, below):.0f} % of synthetic defects "
            f"would be caught instead of {100 * _recall(synthetic, threshold):.0f} %, with FRR <= {100 * st.conformal_bound(good, below):.1f} % "
            f"guaranteed instead of {100 * st.conformal_bound(good, threshold):.1f} %")


def calibrate_scores(
    good_scores: np.ndarray,
    good_map_max: np.ndarray,
    settings: CalibrationSettings | None = None,
    *,
    defect_scores: np.ndarray | None = None,
    defect_types: Sequence[str] | None = None,
    synthetic_scores: np.ndarray | None = None,
    synthetic_families: Sequence[str] = (),
    source: str = "holdout",
    files: Sequence[str] = (),
) -> Calibration:
    """Thresholds from scores of images the model was not fitted on.

    ``good_map_max`` is each good image's largest anomaly-map value: the pixel threshold is set
    on it, so that a good image shows any mask pixel about as rarely as it is falsely rejected.
    ``synthetic_scores`` (synthetic defects made from the same good images) estimate recall at
    each threshold and drive the cost rule; they are estimates, and labelled as such.
    """
    settings = settings or CalibrationSettings()
    good = np.asarray(good_scores, dtype=np.float64)
    good_px = np.asarray(good_map_max, dtype=np.float64)
    defect = np.asarray(defect_scores if defect_scores is not None else [], dtype=np.float64)
    synthetic = np.asarray(synthetic_scores if synthetic_scores is not None else [], dtype=np.float64)
    if good.size == 0:
        raise DefectLensError("calibration needs at least one good image the model was not fitted on")
    if good.size < MIN_RECOMMENDED_IMAGES:
        warnings.warn(f"calibrating on {good.size} good images; {MIN_RECOMMENDED_IMAGES}+ give a more reliable threshold", stacklevel=2)
    if settings.strategy in LABELLED and defect.size == 0:
        raise DefectLensError(f"strategy '{settings.strategy}' needs labelled defect images; with good images only use target_frr or k_sigma")
    if settings.strategy == "cost" and synthetic.size == 0:
        raise DefectLensError("strategy 'cost' needs synthetic defect scores to estimate recall (fit makes them; re-calibrate a model fitted by this version)")

    rules = {**_good_only_thresholds(good, synthetic, settings), **(_labelled_thresholds(good, defect, settings) if defect.size else {})}
    threshold = rules[settings.strategy][1]
    pixel_threshold = pixel_threshold_for(good_px, settings)

    table = []
    for key, (label, t) in rules.items():
        row = {"rule": label, "key": key, **st.confusion_at(good, defect, t), "chosen": key == settings.strategy}
        row["expected_frr"] = st.gumbel_tail(good, t)
        row["guaranteed_frr"] = st.conformal_bound(good, t)
        row["synthetic_recall"] = _recall(synthetic, t)
        table.append(row)

    if settings.strategy == "target_frr":
        guarantee = st.threshold_conformal(good, settings.target_frr, settings.confidence)
    else:  # what the chosen threshold promises on average, whatever rule set it
        bound = st.conformal_bound(good, threshold)
        guarantee = st.Guarantee(threshold, int((good > threshold).sum()) + 1, int(good.size), bound, settings.target_frr, None,
                                 bound <= settings.target_frr, st.images_needed(settings.target_frr))
    good_files = files[: good.size] if len(files) == good.size + defect.size else ()  # good files come first, each one named
    shared_from = None
    if settings.strategy == "target_frr" and not guarantee.achievable:  # where it is, the guarantee's sentence says this
        shared_from = st.images_needed(settings.target_frr, None if settings.confidence is None else 1.0 - settings.confidence, rank=2)
    notes = _outlier_note(good, threshold, good_files, synthetic, shared_from)
    if threshold > good.max():
        gap = (threshold - good.max()) / st.robust_std(good)
        notes.append(f"the threshold lies {gap:.1f} good-score spreads above the largest good score, where no calibration image "
                     "supports it: defects scoring in between are let through")

    per_type: dict[str, dict] = {}
    if defect.size and defect_types is not None:
        types = np.asarray(defect_types)
        for t in sorted(set(types.tolist())):
            sel = defect[types == t]
            entry = {"n": int(sel.size), "recall_at_threshold": float((sel > threshold).mean()),
                     "mean_score": float(sel.mean())}
            entry["thresholds"] = {k: v for k, (_, v) in _labelled_thresholds(good, sel, settings).items()}
            per_type[t] = entry

    return Calibration(
        image_threshold=threshold,
        pixel_threshold=pixel_threshold,
        image_scale=st.robust_std(good),
        pixel_scale=st.robust_std(good_px),
        strategy=settings.strategy,
        params=settings.params,
        source=source,
        n_good=int(good.size),
        n_defect=int(defect.size),
        expected_frr=st.estimate_frr(good, threshold, settings.seed).to_dict(),
        pixel_expected_frr=st.estimate_frr(good_px, pixel_threshold, settings.seed).to_dict(),
        table=table,
        per_type=per_type,
        good_scores=[float(v) for v in good],
        good_map_max=[float(v) for v in good_px],
        defect_scores=[float(v) for v in defect],
        files=[str(f) for f in files],
        guarantee=guarantee.to_dict(),
        tradeoff=tradeoff(good, synthetic, threshold),
        synthetic_scores=[float(v) for v in synthetic],
        synthetic_families=[str(f) for f in synthetic_families],
        notes=notes,
    )
