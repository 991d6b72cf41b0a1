"""Image- and pixel-level metrics of anomaly detection, as defined by the MVTec AD papers."""

from __future__ import annotations

import math

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


# Above this many pixels, pixel metrics are computed from per-image score histograms of BINS bins
# instead of one global sort: memory stays O(BINS + one image) rather than ~70 bytes per pixel
# (DeepPCB at 512 px is 262 M pixels). With 2^20 bins, ties within a bin are the only change.
EXACT_PIXELS = 16_000_000
BINS = 1 << 20


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    masks = np.asarray(masks, dtype=bool)
    if not _both_classes(masks.ravel()):
        return float("nan")
    if masks.size <= EXACT_PIXELS:
        return float(roc_auc_score(masks.ravel(), np.asarray(maps).ravel()))
    binner = _Binner(maps)
    pos, neg = np.zeros(BINS), np.zeros(BINS)
    for chunk in _chunks(len(masks), masks[0].size):
        idx, mask = binner(maps[chunk]), masks[chunk].ravel()
        pos += np.bincount(idx[mask], minlength=BINS)
        neg += np.bincount(idx[~mask], minlength=BINS)
    above = np.cumsum(pos[::-1])[::-1] - pos  # positives in strictly higher bins
    return float((neg * (above + 0.5 * pos)).sum() / (pos.sum() * neg.sum()))


CHUNK_PIXELS = 4_000_000  # pixels binned in one pass: one histogram add per chunk, not per image


def _chunks(n_images: int, pixels_per_image: int) -> list[slice]:
    """Runs of images of about CHUNK_PIXELS pixels: adding a 2^20-bin histogram per image cost
    more than binning its pixels (2 x 8 MB per image, 250 images on DeepPCB)."""
    step = max(1, CHUNK_PIXELS // max(1, pixels_per_image))
    return [slice(i, i + step) for i in range(0, n_images, step)]


class _Binner:
    """Maps scores to bin indices 0..BINS-1 over the global score range."""

    def __init__(self, maps: np.ndarray) -> None:
        self.lo = float(np.min(maps))
        self.scale = (BINS - 1) / max(float(np.max(maps)) - self.lo, 1e-12)

    def __call__(self, score_map: np.ndarray) -> np.ndarray:
        return ((np.asarray(score_map, dtype=np.float64).ravel() - self.lo) * self.scale).astype(np.int64).clip(0, BINS - 1)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit`` FPR, divided by ``fpr_limit``.

    Every ground-truth region weighs the same however large it is, so each of its pixels carries
    1 / (region size * number of regions) of PRO, and each defect-free pixel 1 / (number of
    defect-free pixels) of FPR. Accumulating both weights from the highest score down traces the
    PRO-vs-FPR curve: at every distinct score (exact, no threshold grid) up to EXACT_PIXELS
    pixels, at 2^20 bin edges above that, so memory stays bounded on large test sets.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.shape != np.shape(maps):
        raise ValueError(f"masks {masks.shape} and maps {np.shape(maps)} differ in shape")
    structure = np.ones((3,) * (masks.ndim - 1), dtype=bool)
    regions = [ndimage.label(m, structure=structure) for m in masks]  # per image: regions never span images
    n_regions = sum(n for _, n in regions)
    n_neg = int((~masks).sum())
    if n_regions == 0 or n_neg == 0:
        return float("nan")
    if masks.size <= EXACT_PIXELS:
        maps = np.asarray(maps)
        fpr, pro = _pro_curve_exact(masks, maps if maps.dtype in (np.float32, np.float64) else maps.astype(np.float64), regions,
                                    n_regions, n_neg, fpr_limit)
    else:
        fpr, pro = _pro_curve_binned(masks, maps, regions, n_regions, n_neg)
    if fpr[-1] < fpr_limit:  # cannot happen with all pixels counted, but stay safe
        fpr, pro = np.r_[fpr, fpr_limit], np.r_[pro, pro[-1]]
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    pro_at_limit = np.interp(fpr_limit, fpr[cut - 1 : cut + 1], pro[cut - 1 : cut + 1]) if cut < len(fpr) else pro[-1]
    x = np.r_[fpr[:cut], fpr_limit]
    y = np.r_[pro[:cut], pro_at_limit]
    return float(np.trapezoid(y, x) / fpr_limit)


def _pro_weights(lab: np.ndarray, n: int, n_regions: int) -> np.ndarray:
    """Each region's pixels share 1 / n_regions of PRO, whatever the region's size."""
    sizes = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
    flat = lab.ravel()
    return np.where(flat > 0, 1.0 / (sizes[flat] * n_regions), 0.0)


def _pro_curve_exact(masks: np.ndarray, maps: np.ndarray, regions: list, n_regions: int, n_neg: int,
                     fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct score is a threshold, down to the first whose FPR passes ``fpr_limit``: only
    the pixels scoring at or above that one are sorted (found in linear time), a third or less of
    them, and the curve up to the limit is the same as with all pixels sorted."""
    flat = maps.ravel()
    negative = ~masks.ravel()
    k = min(n_neg, math.ceil(fpr_limit * n_neg) + 1)  # negatives at or above the cut: FPR there > fpr_limit
    negative_scores = flat[negative]
    cut = np.partition(negative_scores, n_neg - k)[n_neg - k]
    top = np.flatnonzero(flat >= cut)
    order = top[np.argsort(-flat[top])]  # ties need no stable order: each run of equal scores ends in one point
    pro_weight = np.concatenate([_pro_weights(lab, n, n_regions) for lab, n in regions])
    scores_sorted = flat[order]
    fpr = np.cumsum(negative[order] / n_neg)
    pro = np.cumsum(pro_weight[order])
    # keep the last index of each run of equal scores: one curve point per distinct threshold
    last = np.r_[scores_sorted[1:] != scores_sorted[:-1], True]
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]


def _pro_curve_binned(masks: np.ndarray, maps: np.ndarray, regions: list, n_regions: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    """Each bin edge is a threshold: per-image weighted histograms, summed from the top bin down."""
    binner = _Binner(maps)
    fpr_hist, pro_hist = np.zeros(BINS), np.zeros(BINS)
    for chunk in _chunks(len(masks), masks[0].size):
        idx = binner(maps[chunk])
        fpr_hist += np.bincount(idx[~masks[chunk].ravel()], minlength=BINS) / n_neg
        weights = np.concatenate([_pro_weights(lab, n, n_regions) for lab, n in regions[chunk]])
        pro_hist += np.bincount(idx, weights=weights, minlength=BINS)
    used = (fpr_hist + pro_hist)[::-1] > 0
    return np.r_[0.0, np.cumsum(fpr_hist[::-1])[used]], np.r_[0.0, np.cumsum(pro_hist[::-1])[used]]
