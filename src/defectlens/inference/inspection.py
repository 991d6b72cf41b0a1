"""The result of inspecting one image, and the defect regions found in it."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage
from skimage import filters

from defectlens.calibration.record import Calibration

# Severity = 0.7 intensity + 0.3 extent: how far the region's evidence goes past the pixel
# threshold matters most; its size raises it, reaching the full 0.3 at this share of the image.
SEVERITY_FULL_AREA_PCT = 2.0
MASK_METHODS = ("threshold", "otsu")


@dataclass
class Region:
    """One connected area of the mask: where a defect is, how strong, what kind it looks like."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels, x1/y1 exclusive
    area_px: int
    area_pct: float
    mean_score: float
    max_score: float
    elongation: float = 1.0  # major / minor axis of the region's ellipse
    severity: float = 0.0  # in [0, 1]
    defect_type: str = ""
    type_source: str = ""  # "prototype" (learned from labelled examples) or "heuristic" (shape)
    type_confidence: float | None = None
    label: int = field(default=0, repr=False)  # its value in the label image find_regions returns

    def to_dict(self) -> dict:
        return {
            "box": list(self.box),
            "area_px": self.area_px,
            "area_pct": round(self.area_pct, 4),
            "mean_score": round(self.mean_score, 6),
            "max_score": round(self.max_score, 6),
            "elongation": round(self.elongation, 3),
            "severity": round(self.severity, 4),
            "type": self.defect_type,
            "type_source": self.type_source,
            "type_confidence": None if self.type_confidence is None else round(self.type_confidence, 4),
        }


def make_mask(anomaly_map: np.ndarray, pixel_threshold: float, method: str = "threshold") -> np.ndarray:
    """Pixels above the calibrated threshold; ``otsu`` splits the map's own histogram instead
    (never below the calibrated threshold, so good texture is not painted as defect)."""
    if method == "threshold":
        return anomaly_map > pixel_threshold
    if method == "otsu":
        level = filters.threshold_otsu(anomaly_map) if np.ptp(anomaly_map) > 0 else pixel_threshold
        return anomaly_map > max(float(level), pixel_threshold)
    raise ValueError(f"mask method must be one of {MASK_METHODS}, got {method!r}")


def find_regions(anomaly_map: np.ndarray, mask: np.ndarray) -> tuple[list[Region], np.ndarray]:
    """Connected components (8-connected) of the mask, largest first, and the label image.

    OpenCV labels and SciPy boxes within the mask's own bounding box, and each region's moments on
    its crop: the same regions as scikit-image's ``regionprops`` (whose ellipse the elongation
    follows) at a fraction of its time, which every rejected image pays on the line's CPU."""
    labels = np.zeros(mask.shape, np.int32)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [], labels
    top, left = int(rows[0]), int(cols[0])
    window = (slice(top, int(rows[-1]) + 1), slice(left, int(cols[-1]) + 1))
    count, labels[window] = cv2.connectedComponents(mask[window].astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    regions = []
    for label, (ys, xs) in enumerate(ndimage.find_objects(labels[window], count - 1), start=1):
        ys, xs = slice(ys.start + top, ys.stop + top), slice(xs.start + left, xs.stop + left)
        inside = labels[ys, xs] == label
        values = anomaly_map[ys, xs][inside]
        moments = cv2.moments(inside.view(np.uint8), binaryImage=True)
        area = moments["m00"]
        inertia = np.array([[moments["mu20"], moments["mu11"]], [moments["mu11"], moments["mu02"]]]) / area
        minor, major = (4.0 * np.sqrt(max(float(v), 0.0)) for v in np.linalg.eigvalsh(inertia))  # the ellipse's axes
        regions.append(Region((xs.start, ys.start, xs.stop, ys.stop), int(area), 100.0 * area / mask.size, float(values.mean()),
                              float(values.max()), elongation=max(major, 1.0) / max(minor, 1.0), label=label))
    return sorted(regions, key=lambda r: -r.area_px), labels


def severity(region: Region, calibration: Calibration) -> float:
    intensity = float(np.clip(2.0 * (calibration.normalise_map(np.float32(region.max_score)) - 0.5), 0.0, 1.0))
    extent = min(1.0, region.area_pct / SEVERITY_FULL_AREA_PCT)
    return 0.7 * intensity + 0.3 * extent


def heuristic_type(region: Region) -> str:
    """Shape-and-contrast description for when no labelled examples exist. A heuristic, and
    named as one in every record: it says what the region looks like, not what caused it."""
    flat = region.mean_score / max(region.max_score, 1e-12)
    if region.area_pct >= 5.0 or (region.area_pct >= 2.0 and flat >= 0.7):
        return "discoloration/deformation-like"
    if region.elongation >= 3.0:
        return "scratch/crack-like"
    return "spot/contamination-like"


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
    normalised_score: float | None = None  # in [0, 1], 0.5 at the threshold
    confidence: float | None = None  # 0 at the threshold, towards 1 far from it
    digest: str | None = None  # sha256 of the image file's bytes, from the read that scored it
    preview: np.ndarray | None = field(default=None, repr=False)  # small uint8 copy to draw the overlay on

    @property
    def verdict(self) -> str:
        if self.is_defective is None:
            return "uncalibrated"
        return "defect" if self.is_defective else "good"

    @property
    def severity(self) -> float:
        return max((r.severity for r in self.regions), default=0.0)

    def to_record(self) -> dict:
        """JSON-ready summary (no pixel arrays): the fields of ``inference.record``, in order."""
        def rnd(v: float | None) -> float | None:
            return None if v is None else round(float(v), 6)

        return {
            "source": self.source,
            "verdict": self.verdict,
            "score": rnd(self.score),
            "normalised_score": rnd(self.normalised_score),
            "confidence": rnd(self.confidence),
            "threshold": rnd(self.threshold),
            "severity": round(self.severity, 4),
            "image_size": [int(self.anomaly_map.shape[1]), int(self.anomaly_map.shape[0])],
            "regions": [r.to_dict() for r in self.regions],
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
            "model": self.model,
        }
