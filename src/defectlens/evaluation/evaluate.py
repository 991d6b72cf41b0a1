"""Run a model over a labelled test split and measure it: per-image records and metrics.

Images the model was calibrated on are left out (and counted), so a labelled threshold is never
judged on the defects it was chosen from: the trap anomalib's users fall into when validation
silently reuses test defects.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from defectlens import metrics
from defectlens.bundle import Bundle
from defectlens.data.datasets import GOOD, Dataset, Sample
from defectlens.data.images import ModelSize, size_hw
from defectlens.errors import DatasetError
from defectlens.inference.inspection import make_mask
from defectlens.jsonutil import finite

GALLERY_SIZE = 8


@dataclass
class GalleryItem:
    """One of the worst-judged images, with its map, for error analysis."""

    sample: Sample
    score: float
    anomaly_map: np.ndarray  # at model size
    kind: str  # "false reject", "escape", "closest good", "closest defect"


@dataclass
class Evaluation:
    dataset: str
    metrics: dict[str, float]
    per_type: dict[str, dict[str, float]]
    records: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    excluded: int = 0  # test images left out because calibration used them
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    types: list[str] = field(default_factory=list)
    threshold: float | None = None
    gallery: list[GalleryItem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "metrics": self.metrics, "per_type": self.per_type, "timings": self.timings,
                "excluded_calibration_images": self.excluded, "records": self.records}

    def save_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(finite(self.to_dict()), indent=2))
        return path

    def table(self) -> str:
        m = self.metrics
        rows = [
            ("image AUROC", m["image_auroc"]),
            ("image AUPR", m["image_aupr"]),
            ("F1-max", m["f1_max"]),
            ("  at threshold", m["f1_threshold"]),
            ("pixel AUROC", m["pixel_auroc"]),
            ("AUPRO (FPR<=0.3)", m["aupro"]),
        ]
        if "accuracy_at_threshold" in m:
            rows += [("accuracy at model threshold", m["accuracy_at_threshold"]),
                     ("false rejects (good called defect)", m["false_rejects"]),
                     ("escapes (defect called good)", m["escapes"]),
                     ("pixel IoU at threshold", m.get("pixel_iou")),
                     ("pixel Dice at threshold", m.get("pixel_dice"))]
        lines = [f"evaluation on '{self.dataset}': {m['n_good']} good, {m['n_defect']} defective test images"]
        if self.excluded:
            lines.append(f"  ({self.excluded} test images left out: the model was calibrated on them)")
        lines += [f"  {name:<36} {fmt(value)}" for name, value in rows]
        if self.per_type:
            lines.append(f"  {'defect type':<20} {'n':>4} {'AUROC':>7} {'recall@thr':>10}")
            for t, d in sorted(self.per_type.items()):
                lines.append(f"  {t:<20} {d['n']:>4} {fmt(d['auroc']):>7} {fmt(d.get('recall_at_threshold')):>10}")
        lines.append(f"  scoring: {self.timings.get('images_per_s', 0):.1f} images/s")
        return "\n".join(lines)


def fmt(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def load_mask(path: Path | None, size: ModelSize) -> np.ndarray:
    h, w = size_hw(size)
    if path is None:
        return np.zeros((h, w), dtype=bool)
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((w, h), Image.NEAREST)) > 127


def overlap_scores(masks: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """IoU and Dice of predicted against true defect pixels, pooled over all images."""
    inter = float(np.logical_and(masks, predicted).sum())
    union = float(np.logical_or(masks, predicted).sum())
    total = float(masks.sum() + predicted.sum())
    return (inter / union if union else float("nan")), (2 * inter / total if total else float("nan"))


def _gallery(samples: list[Sample], labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, threshold: float | None) -> list[GalleryItem]:
    """The misjudged images, worst first, then the closest calls: highest-scored good and
    lowest-scored defective images (all there is to show without a threshold)."""
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    chosen: list[tuple[int, str]] = []
    if threshold is not None:  # both kinds of mistake get room: half the gallery each, worst first
        rejects = [i for i in good[np.argsort(-scores[good])] if scores[i] > threshold]
        escapes = [i for i in bad[np.argsort(scores[bad])] if scores[i] <= threshold]
        n_rej = min(len(rejects), max(GALLERY_SIZE // 2, GALLERY_SIZE - len(escapes)))
        chosen = [(i, "false reject") for i in rejects[:n_rej]] + [(i, "escape") for i in escapes[: GALLERY_SIZE - n_rej]]
    taken = {i for i, _ in chosen}
    closest = [(i, "closest good") for i in good[np.argsort(-scores[good])] if i not in taken][:2]
    closest += [(i, "closest defect") for i in bad[np.argsort(scores[bad])] if i not in taken][:2]
    chosen += closest[: max(0, GALLERY_SIZE - len(chosen))]
    return [GalleryItem(samples[i], float(scores[i]), maps[i], kind) for i, kind in chosen]


def evaluate(bundle: Bundle, dataset: Dataset, progress: bool = False) -> Evaluation:
    """Score every test image; image metrics on all, pixel metrics where masks exist."""
    calibration = bundle.calibration
    seen = set(calibration.files) if calibration else set()
    samples = [s for s in dataset.test if str(s.path.resolve()) not in seen and str(s.path) not in seen]
    excluded = len(dataset.test) - len(samples)
    if not samples:
        raise DatasetError(f"{dataset.root}: no test images to evaluate on" + (f" ({excluded} were used for calibration)" if excluded else ""))
    detector = bundle.detector
    t0 = time.perf_counter()
    raw, maps = detector.score([s.path for s in samples], progress=progress)
    elapsed = time.perf_counter() - t0
    scores = detector.decision_scores(raw, maps, calibration)
    labels = np.array([s.label for s in samples])
    # pixel metrics: good images (all-background) and defective images that have a mask
    pixel_idx = [i for i, s in enumerate(samples) if s.label == 0 or s.mask_path is not None]
    masks = np.stack([load_mask(samples[i].mask_path, detector.image_size) for i in pixel_idx]) if pixel_idx else None
    pixel_maps = maps[pixel_idx] if pixel_idx else None
    f1, f1_thr = metrics.f1_max(labels, scores)
    result = {
        "n_good": int((labels == 0).sum()),
        "n_defect": int((labels == 1).sum()),
        "image_auroc": metrics.image_auroc(labels, scores),
        "image_aupr": metrics.image_aupr(labels, scores),
        "f1_max": f1,
        "f1_threshold": f1_thr,
        "pixel_auroc": metrics.pixel_auroc(masks, pixel_maps) if masks is not None else float("nan"),
        "aupro": metrics.aupro(masks, pixel_maps) if masks is not None else float("nan"),
    }
    threshold = calibration.image_threshold if calibration else None
    predicted = calibration.rejects(scores) if calibration else None
    if predicted is not None:
        result["threshold"] = threshold
        result["pixel_threshold"] = calibration.pixel_threshold
        result["accuracy_at_threshold"] = float((predicted == labels.astype(bool)).mean())
        result["false_rejects"] = int((predicted & (labels == 0)).sum())
        result["escapes"] = int((~predicted & (labels == 1)).sum())
        result["frr"] = result["false_rejects"] / max(1, result["n_good"])
        result["recall"] = float(predicted[labels == 1].mean()) if result["n_defect"] else float("nan")
        if masks is not None:
            result["pixel_iou"], result["pixel_dice"] = overlap_scores(masks, make_mask(pixel_maps, calibration.pixel_threshold))
    per_type = {}
    good = labels == 0
    for t in sorted({s.defect_type for s in samples if s.label}):
        sel = np.array([s.defect_type == t for s in samples])
        entry = {"n": int(sel.sum()), "auroc": metrics.image_auroc(labels[good | sel], scores[good | sel]),
                 "mean_score": float(scores[sel].mean())}
        if predicted is not None:
            entry["recall_at_threshold"] = float(predicted[sel].mean())
        per_type[t] = entry
    normalised = calibration.normalise(scores) if calibration else None
    records = [
        {
            "path": str(s.path),
            "defect_type": s.defect_type,
            "label": GOOD if s.label == 0 else "defect",
            "score": float(scores[i]),
            "normalised_score": None if normalised is None else float(normalised[i]),
            "verdict": None if predicted is None else ("defect" if predicted[i] else "good"),
        }
        for i, s in enumerate(samples)
    ]
    timings = {"score_s": elapsed, "images_per_s": len(samples) / elapsed if elapsed > 0 else 0.0,
               "ms_per_image": 1000.0 * elapsed / len(samples)}
    return Evaluation(dataset.name, result, per_type, records, timings, excluded, labels, scores,
                      [s.defect_type for s in samples], threshold, _gallery(samples, labels, scores, maps, threshold))
