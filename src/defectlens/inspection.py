"""The result of inspecting one image, and the defect regions found in it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage


@dataclass
class Region:
    """One connected area of the mask: where a defect is and how strong it is."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels, x1/y1 exclusive
    area_px: int
    area_pct: float
    mean_score: float
    max_score: float

    def to_dict(self) -> dict:
        return {
            "box": list(self.box),
            "area_px": self.area_px,
            "area_pct": round(self.area_pct, 4),
            "mean_score": round(self.mean_score, 6),
            "max_score": round(self.max_score, 6),
        }


def find_regions(anomaly_map: np.ndarray, mask: np.ndarray) -> list[Region]:
    """Connected components (8-connected) of the mask, largest first."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return []
    total = mask.size
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(anomaly_map), labels, index)
    means = ndimage.mean(anomaly_map, labels, index)
    maxes = ndimage.maximum(anomaly_map, labels, index)
    regions = []
    for i, sl in enumerate(ndimage.find_objects(labels)):
        ys, xs = sl
        regions.append(Region((xs.start, ys.start, xs.stop, ys.stop), int(areas[i]), 100.0 * areas[i] / total, float(means[i]), float(maxes[i])))
    return sorted(regions, key=lambda r: -r.area_px)


@dataclass
class Inspection:
    """Everything known about one inspected image. Maps are at the image's own size."""

    source: str
    score: float
    threshold: float | None
    is_defective: bool | None  # None when the model has no calibrated threshold
    anomaly_map: np.ndarray
    mask: np.ndarray | None
    regions: list[Region] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    model: str = ""

    @property
    def verdict(self) -> str:
        if self.is_defective is None:
            return "uncalibrated"
        return "defect" if self.is_defective else "good"

    def to_record(self) -> dict:
        """JSON-ready summary (no pixel arrays)."""
        return {
            "source": self.source,
            "verdict": self.verdict,
            "score": round(float(self.score), 6),
            "threshold": None if self.threshold is None else round(float(self.threshold), 6),
            "image_size": [int(self.anomaly_map.shape[1]), int(self.anomaly_map.shape[0])],
            "regions": [r.to_dict() for r in self.regions],
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
            "model": self.model,
        }
