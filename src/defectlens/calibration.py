"""Decision thresholds fitted on held-out good images.

This is the good-only rule the walking skeleton needs to give verdicts: threshold = mean + k
standard deviations of the held-out good scores, for the image score and for the per-image
maximum of the anomaly map (so good images produce almost no mask pixels). Richer strategies
(target false-reject rate with a confidence interval, labelled F1/recall rules) extend this
record; the bundle stores it as a plain dictionary.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import DefectLensError

MIN_RECOMMENDED_IMAGES = 10
# With very few images the sample std is unreliable (zero for one image); floor it at this
# fraction of the mean so a single held-out image still gives a usable, conservative threshold.
STD_FLOOR_FRACTION = 0.05


@dataclass
class Calibration:
    image_threshold: float
    pixel_threshold: float
    method: str
    n_images: int
    k_sigma: float
    good_image_scores: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        try:
            return cls(**data)
        except TypeError as exc:
            raise DefectLensError(f"calibration record is not understood ({exc})") from None


def _mean_k_sigma(values: np.ndarray, k: float) -> float:
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return mean + k * max(std, STD_FLOOR_FRACTION * abs(mean))


def calibrate_good_only(scores: np.ndarray, maps: np.ndarray, k_sigma: float = 3.0) -> Calibration:
    """Thresholds from the scores and maps of good images the model was not fitted on."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise DefectLensError("calibration needs at least one held-out good image")
    if scores.size < MIN_RECOMMENDED_IMAGES:
        warnings.warn(
            f"calibrating on {scores.size} good images; {MIN_RECOMMENDED_IMAGES}+ give a more reliable threshold",
            stacklevel=2,
        )
    map_max = np.asarray(maps, dtype=np.float64).reshape(len(scores), -1).max(axis=1)
    return Calibration(
        image_threshold=_mean_k_sigma(scores, k_sigma),
        pixel_threshold=_mean_k_sigma(map_max, k_sigma),
        method="good_only_mean_k_sigma",
        n_images=int(scores.size),
        k_sigma=k_sigma,
        good_image_scores=[float(s) for s in scores],
    )
