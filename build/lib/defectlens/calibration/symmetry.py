"""Symmetry break: for parts that are symmetric (a bottle seen from above, a round seal), a
defect on one side makes the anomaly evidence differ from its mirror image.

The appearance score already sees most defects; this score helps when a whole side looks
slightly off (a dent, a deformation) but no single patch is far from a good one. It is only
combined with the appearance score when labelled calibration shows that it raises the AUROC.
"""

from __future__ import annotations

import numpy as np
import torch

from defectlens.metrics import image_auroc

MIN_GAIN = 0.002  # AUROC gain below this is noise on the few images calibration has


def asymmetry(maps: np.ndarray, axes: str) -> np.ndarray:
    """Largest difference between the anomaly map and its mirror, per image (N,).

    Maps are at the model input size, where a centred part is centred in the map.
    """
    maps = torch.as_tensor(np.asarray(maps, dtype=np.float64))
    return asymmetry_torch(maps[None] if maps.ndim == 2 else maps, axes).numpy()


def asymmetry_torch(maps: torch.Tensor, axes: str) -> torch.Tensor:
    """The same on a (N, H, W) tensor: what an exported ONNX graph computes, so both agree."""
    parts = []
    if "lr" in axes:
        parts.append((maps - maps.flip(2)).abs().flatten(1).max(dim=1).values)
    if "tb" in axes:
        parts.append((maps - maps.flip(1)).abs().flatten(1).max(dim=1).values)
    return torch.stack(parts).max(dim=0).values


def choose_weight(good_scores: np.ndarray, good_asym: np.ndarray, defect_scores: np.ndarray, defect_asym: np.ndarray) -> dict:
    """Try a few weights for score + w * asymmetry; keep the best only if it beats appearance alone."""
    labels = np.r_[np.zeros(len(good_scores)), np.ones(len(defect_scores))]
    scores = np.r_[good_scores, defect_scores]
    asym = np.r_[good_asym, defect_asym]
    base = image_auroc(labels, scores)
    unit = float(np.std(good_scores)) / max(float(np.std(good_asym)), 1e-12)
    best_w, best = 0.0, base
    for factor in (0.25, 0.5, 1.0, 2.0, 4.0):
        auroc = image_auroc(labels, scores + factor * unit * asym)
        if auroc > best:
            best_w, best = factor * unit, auroc
    return {"weight": best_w, "auroc_appearance": base, "auroc_combined": best, "used": bool(best >= base + MIN_GAIN)}
