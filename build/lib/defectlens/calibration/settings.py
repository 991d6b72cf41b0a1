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
    """Which rule sets the threshold, and its target. Default: the conformal threshold for 1 %
    false rejects, which with fewer than 99 good images is the largest good score."""

    strategy: str = "target_frr"
    target_frr: float = 0.01
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
