"""Image- and pixel-level metrics of anomaly detection, as defined by the MVTec AD papers."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def _both_classes(labels: np.ndarray) -> bool:
    return labels.min() != labels.max()


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels)
    return float(roc_auc_score(labels, scores)) if _both_classes(labels) else float("nan")


def image_aupr(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels)
    return float(average_precision_score(labels, scores)) if _both_classes(labels) else float("nan")


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold reaching it (score >= threshold is a defect)."""
    labels = np.asarray(labels)
    if not _both_classes(labels):
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    return float(f1[best]), float(thresholds[best])


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    masks = np.asarray(masks, dtype=bool).ravel()
    return float(roc_auc_score(masks, np.asarray(maps).ravel())) if _both_classes(masks) else float("nan")


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit`` FPR, divided by ``fpr_limit``.

    Exact (no threshold grid): every ground-truth region weighs the same however large it is,
    so each of its pixels carries 1 / (region size * number of regions) of PRO, and each
    defect-free pixel 1 / (number of defect-free pixels) of FPR. Sorting all pixels by score
    and accumulating both weights traces the PRO-vs-FPR curve at every distinct threshold.
    """
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    labels = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    structure = np.ones((3,) * (masks.ndim - 1), dtype=bool)
    for i in range(masks.shape[0]):  # label each image separately: regions never span images
        lab, n = ndimage.label(masks[i], structure=structure)
        labels[i] = np.where(lab > 0, lab + offset, 0)
        offset += n
    n_regions = offset
    negatives = ~masks
    n_neg = int(negatives.sum())
    if n_regions == 0 or n_neg == 0:
        return float("nan")
    flat_labels = labels.ravel()
    sizes = np.bincount(flat_labels, minlength=n_regions + 1).astype(np.float64)
    pro_weight = np.where(flat_labels > 0, 1.0 / (sizes[flat_labels] * n_regions), 0.0)
    fpr_weight = negatives.ravel() / n_neg
    order = np.argsort(-maps.ravel(), kind="stable")
    scores_sorted = maps.ravel()[order]
    fpr = np.cumsum(fpr_weight[order])
    pro = np.cumsum(pro_weight[order])
    # keep the last index of each run of equal scores: one curve point per distinct threshold
    last = np.r_[scores_sorted[1:] != scores_sorted[:-1], True]
    fpr = np.r_[0.0, fpr[last]]
    pro = np.r_[0.0, pro[last]]
    if fpr[-1] < fpr_limit:  # cannot happen with all pixels counted, but stay safe
        fpr, pro = np.r_[fpr, fpr_limit], np.r_[pro, pro[-1]]
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    pro_at_limit = np.interp(fpr_limit, fpr[cut - 1 : cut + 1], pro[cut - 1 : cut + 1]) if cut < len(fpr) else pro[-1]
    x = np.r_[fpr[:cut], fpr_limit]
    y = np.r_[pro[:cut], pro_at_limit]
    return float(np.trapezoid(y, x) / fpr_limit)
