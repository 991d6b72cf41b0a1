"""Run a model over a labelled test split and measure it: per-image records and metrics."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import metrics
from .bundle import Bundle
from .data.datasets import GOOD, Dataset
from .errors import DatasetError
from .jsonutil import finite


@dataclass
class Evaluation:
    dataset: str
    metrics: dict[str, float]
    per_type: dict[str, dict[str, float]]
    records: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "metrics": self.metrics, "per_type": self.per_type, "timings": self.timings, "records": self.records}

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
                     ("escapes (defect called good)", m["escapes"])]
        lines = [f"evaluation on '{self.dataset}': {m['n_good']} good, {m['n_defect']} defective test images"]
        lines += [f"  {name:<36} {_fmt(value)}" for name, value in rows]
        if self.per_type:
            lines.append(f"  {'defect type':<20} {'n':>4} {'AUROC':>7} {'recall@thr':>10}")
            for t, d in sorted(self.per_type.items()):
                lines.append(f"  {t:<20} {d['n']:>4} {_fmt(d['auroc']):>7} {_fmt(d.get('recall_at_threshold')):>10}")
        lines.append(f"  scoring: {self.timings.get('images_per_s', 0):.1f} images/s")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def load_mask(path: Path | None, size: int) -> np.ndarray:
    if path is None:
        return np.zeros((size, size), dtype=bool)
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((size, size), Image.NEAREST)) > 127


def evaluate(bundle: Bundle, dataset: Dataset, progress: bool = False) -> Evaluation:
    """Score every test image; image metrics on all, pixel metrics where masks exist."""
    if not dataset.test:
        raise DatasetError(f"{dataset.root}: no test images to evaluate on")
    detector = bundle.detector
    samples = dataset.test
    t0 = time.perf_counter()
    scores, maps = detector.score([s.path for s in samples], progress=progress)
    elapsed = time.perf_counter() - t0
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
    threshold = bundle.calibration.image_threshold if bundle.calibration else None
    predicted = scores > threshold if threshold is not None else None
    if predicted is not None:
        result["accuracy_at_threshold"] = float((predicted == labels.astype(bool)).mean())
        result["false_rejects"] = int((predicted & (labels == 0)).sum())
        result["escapes"] = int((~predicted & (labels == 1)).sum())
    per_type = {}
    good = labels == 0
    for t in dataset.defect_types:
        sel = np.array([s.defect_type == t for s in samples])
        entry = {"n": int(sel.sum()), "auroc": metrics.image_auroc(labels[good | sel], scores[good | sel])}
        if predicted is not None:
            entry["recall_at_threshold"] = float(predicted[sel].mean())
        per_type[t] = entry
    records = [
        {
            "path": str(s.path),
            "defect_type": s.defect_type,
            "label": GOOD if s.label == 0 else "defect",
            "score": float(scores[i]),
            "verdict": None if predicted is None else ("defect" if predicted[i] else "good"),
        }
        for i, s in enumerate(samples)
    ]
    timings = {"score_s": elapsed, "images_per_s": len(samples) / elapsed if elapsed > 0 else 0.0}
    return Evaluation(dataset.name, result, per_type, records, timings)
