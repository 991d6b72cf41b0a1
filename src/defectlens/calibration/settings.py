"""What a calibration is asked to do: the rule, its target, and where unseen good scores come
from. Kept free of the maths (no SciPy) so that the command line can show its defaults at once."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from defectlens.errors import DefectLensError

SYMMETRY_AXES = ("lr", "tb", "lrtb")  # mirror axes of the symmetry term: left-right, top-bottom, both
GOOD_ONLY = ("target_frr", "tail", "k_sigma", "cost")
LABELLED = ("f1", "target_recall", "zero_false_rejects")
STRATEGIES = GOOD_ONLY + LABELLED


@dataclass(frozen=True)
class CalibrationSettings:
    """Which rule sets the threshold, and its target. Default: the conformal threshold for 2 %
    false rejects, which with fewer than 99 good images is the largest good score.

    Why 2 % and not 1 %: the acceptance a line asks of a threshold is at most 5 % false rejects
    with as much recall as any threshold could have at that rate. With the 199 images `fit` holds
    out from 597 on, 2 % is the fourth largest score, whose false-reject rate goes past 5 % on
    fewer than 1 % of calibration sets whatever the score law (Beta(4, 196)); 1 % is the second
    largest, which sits where good scores are sparse, so where it lands between two of them
    decides much of the recall. Measured over re-splits at full size, 2 % met that acceptance on
    0.90 (Magnetic Tile) and 0.66 (DeepPCB) of them, 1 % on 0.50 and 0.53 (docs/thresholds.md).
    Below 99 calibration images both are the largest score."""

    strategy: str = "target_frr"
    target_frr: float = 0.02
    confidence: float | None = None  # target_frr with this confidence (PAC) instead of on average
    k_sigma: float = 3.0
    escape_cost: float = 10.0  # cost rule: an escaped defect costs this many false rejects
    defect_rate: float = 0.05  # cost rule: share of defective parts expected on the line
    target_recall: float = 0.95
    symmetry: str | None = None  # "lr", "tb" or "lrtb": try the symmetry-break score (needs defects)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise DefectLensError(f"unknown calibration strategy '{self.strategy}'; choose from {', '.join(STRATEGIES)}")
        if self.symmetry not in (None, *SYMMETRY_AXES):
            raise DefectLensError(f"symmetry must be lr, tb or lrtb, got {self.symmetry!r}")
        if not 0.0 < self.target_frr < 1.0:
            raise DefectLensError(f"target false-reject rate must be between 0 and 1, got {self.target_frr}")
        if self.confidence is not None and not 0.0 < self.confidence < 1.0:
            raise DefectLensError(f"confidence must be between 0 and 1, got {self.confidence}")

    @property
    def params(self) -> dict:
        keys = {"target_frr": ["target_frr", "confidence"], "tail": ["target_frr"], "k_sigma": ["k_sigma"],
                "cost": ["escape_cost", "defect_rate"], "target_recall": ["target_recall"]}.get(self.strategy, [])
        return {k: v for k, v in asdict(self).items() if k in keys}


# where unseen good scores come from (see workflows.fitting)
SCHEMES = ("auto", "holdout", "kfold", "single-image")
