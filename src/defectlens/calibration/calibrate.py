"""Choose thresholds from scores: good-only or labelled rules, and the table of what each costs."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import DefectLensError
from . import strategies as st
from .record import Calibration

GOOD_ONLY = ("target_frr", "k_sigma")
LABELLED = ("f1", "target_recall", "zero_false_rejects")
STRATEGIES = GOOD_ONLY + LABELLED
MIN_RECOMMENDED_IMAGES = 10


@dataclass(frozen=True)
class CalibrationSettings:
    """Which rule sets the threshold, and its target. Defaults: reject 1 % of good parts."""

    strategy: str = "target_frr"
    target_frr: float = 0.01
    k_sigma: float = 3.0
    target_recall: float = 0.95
    symmetry: str | None = None  # "lr", "tb" or "lrtb": try the symmetry-break score (needs defects)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise DefectLensError(f"unknown calibration strategy '{self.strategy}'; choose from {', '.join(STRATEGIES)}")
        if self.symmetry not in (None, "lr", "tb", "lrtb"):
            raise DefectLensError(f"symmetry must be lr, tb or lrtb, got {self.symmetry!r}")

    @property
    def params(self) -> dict:
        keys = {"target_frr": ["target_frr"], "k_sigma": ["k_sigma"], "target_recall": ["target_recall"]}.get(self.strategy, [])
        return {k: v for k, v in asdict(self).items() if k in keys}


def _good_only_threshold(values: np.ndarray, settings: CalibrationSettings) -> float:
    if settings.strategy == "k_sigma":
        return st.threshold_k_sigma(values, settings.k_sigma)
    return st.threshold_for_frr(values, settings.target_frr)


def pixel_threshold_for(good_map_max: np.ndarray, settings: CalibrationSettings) -> float:
    """The pixel threshold always comes from good images: labelled rules pick the image
    threshold, but masks must stay clean on good parts whatever rule was chosen."""
    pixel_settings = settings if settings.strategy in GOOD_ONLY else CalibrationSettings(target_frr=settings.target_frr)
    return _good_only_threshold(np.asarray(good_map_max, dtype=np.float64), pixel_settings)


def _labelled_thresholds(good: np.ndarray, defect: np.ndarray, settings: CalibrationSettings) -> dict[str, tuple[str, float]]:
    return {
        "f1": ("F1-max", st.threshold_f1(good, defect)),
        "target_recall": (f"recall >= {100 * settings.target_recall:g} %", st.threshold_for_recall(good, defect, settings.target_recall)),
        "zero_false_rejects": ("zero false rejects", st.threshold_zero_false_rejects(good, defect)),
    }


def calibrate_scores(
    good_scores: np.ndarray,
    good_map_max: np.ndarray,
    settings: CalibrationSettings = CalibrationSettings(),
    *,
    defect_scores: np.ndarray | None = None,
    defect_types: Sequence[str] | None = None,
    source: str = "holdout",
    files: Sequence[str] = (),
) -> Calibration:
    """Thresholds from scores of images the model was not fitted on.

    ``good_map_max`` is each good image's largest anomaly-map value: the pixel threshold is set
    on it, so that a good image shows any mask pixel about as rarely as it is falsely rejected.
    """
    good = np.asarray(good_scores, dtype=np.float64)
    good_px = np.asarray(good_map_max, dtype=np.float64)
    defect = np.asarray(defect_scores if defect_scores is not None else [], dtype=np.float64)
    if good.size == 0:
        raise DefectLensError("calibration needs at least one good image the model was not fitted on")
    if good.size < MIN_RECOMMENDED_IMAGES:
        warnings.warn(f"calibrating on {good.size} good images; {MIN_RECOMMENDED_IMAGES}+ give a more reliable threshold", stacklevel=2)
    if settings.strategy in LABELLED and defect.size == 0:
        raise DefectLensError(f"strategy '{settings.strategy}' needs labelled defect images; with good images only use target_frr or k_sigma")

    good_only = {
        "target_frr": (f"target FRR {100 * settings.target_frr:g} %", st.threshold_for_frr(good, settings.target_frr)),
        "k_sigma": (f"mean + {settings.k_sigma:g} sigma", st.threshold_k_sigma(good, settings.k_sigma)),
    }
    labelled = _labelled_thresholds(good, defect, settings) if defect.size else {}
    rules = {**good_only, **labelled}
    threshold = rules[settings.strategy][1]
    pixel_threshold = pixel_threshold_for(good_px, settings)

    table = []
    for key, (label, t) in rules.items():
        row = {"rule": label, "key": key, **st.confusion_at(good, defect, t), "chosen": key == settings.strategy}
        row["expected_frr"] = st.gumbel_tail(good, t)
        table.append(row)

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
    )
