"""A Gaussian per position of the patch grid, and how far to pool the positions' covariances.

A position's covariance is estimated from one patch per training image: 15-50 patches on a small
set, in 64 dimensions. Ledoit-Wolf shrinks it towards a scaled identity by the amount that is best
for the covariance itself, not for its inverse, which is what scores. Directions in which the few
training images did not vary at that position keep little variance, and a good image the fit never
saw that varies there scores far out. The k-fold calibration sets the threshold on exactly such
images: on bottle at 20 images the Gaussian term alone put it 2-3x above the deployed model's
largest score on good test parts, and let 29-52 % of the defects through.

Pooling replaces a share of each position's covariance by the mean covariance over all positions,
so those directions get the variance seen elsewhere on the part. How much helps depends on the
part. On bottle (five draws of 20 and 50 images, and all 209) a share of 0.5 kept 86-98 % of the
defects above the threshold, against 44-94 % unpooled; on Magnetic Tile at 50 images every share
lost recall (39 -> 17 % at 0.1), and at 20 images 0.1 gained it on two draws and lost it on the
third. So the share is chosen per fit, from good images and synthetic defects only
(:func:`choose_pooling`), by what the threshold is judged by: how many synthetic defects score above
the largest good score of images the fit did not see. Chosen so, it came within 2 points of the
best share's recall on 13 of 14 runs on bottle, Magnetic Tile and AITEX, and 10 points below it on
the 14th (the Gaussian term alone, scripts outside the project, 2026-12-07; docs/thresholds.md has
the table and what SimpleNet as a whole did).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import KFold

POOLING_GRID = (0.0, 0.1, 0.25, 0.5, 0.75)  # not 1: one Gaussian for all positions scored Magnetic Tile 0.63, one each 0.96
POOLING_FOLDS = 5  # a fold's Gaussians then see 80 % of the images, about what a calibration fold model's see (77 %)
POOLING_MIN_IMAGES = 5  # fewer leave one or two images per fold: the choice would rest on noise
SYNTHETIC_PER_IMAGE = 4  # synthetic defects made from each left-out image...
SYNTHETIC_MAX = 120  # ...up to this many in all (embedding them is the choice's main cost)

# features of synthetic defects made from the given training images: (ids, how many, seed) -> (k, h, w, d), or None
DefectFeatures = Callable[[np.ndarray, int, int], "torch.Tensor | None"]


@dataclass
class PoolingChoice:
    """The chosen share, why, and each tried share's synthetic recall (empty when nothing was measured)."""

    pooling: float
    reason: str
    recall: dict[float, float] = field(default_factory=dict)


def _ledoit_wolf(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, n, d) float64 patches -> their means (p, d), empirical covariances (p, d, d),
    Ledoit-Wolf shrinkages (p,) and identity scales tr/d (p,): Ledoit & Wolf (2004), as
    ``sklearn.covariance.ledoit_wolf_shrinkage`` writes it, for a chunk of positions at once."""
    n, d = c.shape[1:]
    mean = c.mean(dim=1)
    c = c - mean[:, None]
    emp = c.transpose(1, 2) @ c / n
    sq = c * c
    trace = emp.diagonal(dim1=1, dim2=2).sum(-1)
    mu = trace / d
    beta_ = (sq.transpose(1, 2) @ sq).sum((1, 2))
    delta_ = (emp * emp).sum((1, 2))
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * trace + d * mu**2) / d
    shrinkage = torch.where(beta == 0, torch.zeros_like(beta), torch.minimum(beta, delta) / delta)
    return mean, emp, shrinkage, mu


def _chunks(x: np.ndarray, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(n, P, d) patches (any float type) as (p, n, d) float64 tensors, ``chunk`` positions at a time."""
    for p0 in range(0, x.shape[1], chunk):
        yield p0, torch.from_numpy(np.ascontiguousarray(x[:, p0 : p0 + chunk].transpose(1, 0, 2))).double()


def shrinkages(x: np.ndarray, chunk: int = 128) -> np.ndarray:
    """(n, P, d) patches -> (P,) each position's Ledoit-Wolf shrinkage towards the scaled identity
    (PaDiM estimates it on a sample of its images and applies it to the covariance it streams)."""
    out = np.empty(x.shape[1])
    for p0, c in _chunks(x, chunk):
        out[p0 : p0 + chunk] = _ledoit_wolf(c)[2].numpy()
    return out


def covariances(x: np.ndarray, chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(n, P, d) patches (any float type) -> (P, d) means and (P, d, d) Ledoit-Wolf-shrunk
    covariances, float64. Positions go ``chunk`` at a time, as one batched product each:
    scikit-learn's ``ledoit_wolf``, one position at a time, took 5 s of a 14 s fit on 20 images, and
    all positions at once in float64 held 0.5 GB more at 1000 images. One image has no spread to
    estimate: its covariance is the identity at the patches' scale."""
    n, positions, d = x.shape
    if n == 1:
        first = x[0].astype(np.float64)
        return first, np.eye(d) * np.maximum((first**2).mean(axis=1), 1e-6)[:, None, None]
    means, covs = np.empty((positions, d)), np.empty((positions, d, d))
    eye = torch.eye(d, dtype=torch.float64)
    for p0, c in _chunks(x, chunk):
        mean, emp, shrinkage, mu = _ledoit_wolf(c)
        means[p0 : p0 + chunk] = mean.numpy()
        covs[p0 : p0 + chunk] = ((1 - shrinkage)[:, None, None] * emp + (shrinkage * mu)[:, None, None] * eye).numpy()
    return means, covs


def pool(covs: np.ndarray, pooling: float) -> np.ndarray:
    """Each position's covariance with a share ``pooling`` of it replaced by the mean over positions,
    and a trace-relative ridge so that none is singular."""
    d = covs.shape[-1]
    if pooling:
        covs = (1 - pooling) * covs + pooling * covs.mean(axis=0)
    return covs + np.eye(d) * 1e-6 * np.trace(covs, axis1=1, axis2=2)[:, None, None] / d


def whiteners(covs: np.ndarray, pooling: float = 0.0) -> np.ndarray:
    """(P, d, d) matrices W with W W^T the inverse of each pooled covariance, so that
    ``(x - mean) @ W`` has the Mahalanobis distance as its length."""
    return np.linalg.cholesky(np.linalg.inv(pool(covs, pooling)))


def position_gaussians(features: torch.Tensor, pooling: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each grid position's Gaussian over training patch grids (n, h, w, d): (P, d) float32 means
    and (P, d, d) whitening matrices (see :func:`whiteners`)."""
    n, h, w, d = features.shape
    means, covs = covariances(features.reshape(n, h * w, d).numpy())
    return torch.from_numpy(means.astype(np.float32)), torch.from_numpy(np.ascontiguousarray(whiteners(covs, pooling), dtype=np.float32))


def whiten(x: torch.Tensor, center: torch.Tensor, whitener: torch.Tensor) -> torch.Tensor:
    """Patch grids (n, h, w, d) whitened by (P, d) means and (P, d, d) whitening matrices."""
    n, h, w, d = x.shape
    return torch.einsum("npd,pde->npe", x.reshape(n, h * w, d) - center, whitener).reshape(n, h, w, d)


def largest_distance(x: np.ndarray, means: np.ndarray, factors: torch.Tensor) -> np.ndarray:
    """(k, P, d) patch grids -> (k,) the largest squared Mahalanobis distance over each grid's
    positions, under covariances given by their (P, d, d) lower Cholesky factors (a triangular
    solve: the choice never forms an inverse)."""
    out = np.empty(len(x))
    for i in range(0, len(x), 16):  # (P, d, 16) at a time: a few MiB
        diff = torch.from_numpy(np.ascontiguousarray((x[i : i + 16].astype(np.float64) - means).transpose(1, 2, 0)))
        z = torch.linalg.solve_triangular(factors, diff, upper=False)
        out[i : i + 16] = (z * z).sum(1).amax(0).numpy()
    return out


def best_share(grid: tuple[float, ...], good: np.ndarray, synthetic: list[np.ndarray]) -> tuple[float, dict[float, float]]:
    """The share whose synthetic scores (one array per share) lie most above its largest good score
    (``good``: one row of left-out good scores per share), ties broken as :func:`choose_pooling`
    says; and each share's synthetic recall at its largest good score."""
    top2 = np.sort(good, axis=1)[:, -2:]  # each share's second largest and largest left-out good score
    recall = {share: float(np.mean(synthetic[k] > top2[k, 1])) for k, share in enumerate(grid)}
    next_recall = {share: float(np.mean(synthetic[k] > top2[k, 0])) for k, share in enumerate(grid)}
    return max(grid, key=lambda share: (recall[share], next_recall[share], -share)), recall


def choose_pooling(features: torch.Tensor, defects: DefectFeatures, seed: int = 0,
                   grid: tuple[float, ...] = POOLING_GRID) -> PoolingChoice:
    """The pooling share under which the most synthetic defects score above every unseen good image.

    Folds of the training patch grids (n, h, w, d): each fold's Gaussians score its left-out
    good images and synthetic defects made from them, under every share in ``grid``. A share's
    threshold is the largest left-out good score, which is where the k-fold calibration puts it on
    a small set; its recall is the share of synthetic defects above that. A tie is broken by the
    recall above the second largest left-out good score: the largest alone is one image, and
    where the shares catch the same defects above it the next one still tells them apart (in the
    Gaussian-term runs of docs/thresholds.md, bottle at 20 images, seed 0, tied at the largest and
    took 0.1, catching 76 % of the real defects where 0.5 caught 86 %; broken so, the rule came
    within 2 points of the best share on all 16 runs, against 15; through ``fit``, on 12 draws of
    bottle and Magnetic Tile, it changed no result). Remaining ties go to the smaller share, the
    nearer one to each position's own covariance.
    """
    n, h, w, d = features.shape
    if n < POOLING_MIN_IMAGES:
        return PoolingChoice(0.0, f"{n} images, fewer than {POOLING_MIN_IMAGES}: covariances not pooled")
    x = features.reshape(n, h * w, d).numpy()  # as cached (float16): converted a chunk at a time
    folds = min(POOLING_FOLDS, n)
    per_fold = math.ceil(min(SYNTHETIC_PER_IMAGE * n, SYNTHETIC_MAX) / folds)
    good = np.zeros((len(grid), n))
    bad: list[list[np.ndarray]] = [[] for _ in grid]
    for fold, (train, held) in enumerate(KFold(folds, shuffle=True, random_state=seed).split(x)):
        synthetic = defects(held, per_fold, seed + fold)
        if synthetic is None:
            return PoolingChoice(0.0, "no synthetic defects to choose by: covariances not pooled")
        s = synthetic.reshape(len(synthetic), h * w, d).numpy()
        means, covs = covariances(x[train])
        for k, share in enumerate(grid):
            factors = torch.linalg.cholesky(torch.from_numpy(pool(covs, share)))
            good[k, held] = largest_distance(x[held], means, factors)
            bad[k].append(largest_distance(s, means, factors))
    best, recall = best_share(grid, good, [np.concatenate(b) for b in bad])
    unpooled = f", {recall[0.0]:.0%} unpooled" if 0.0 in recall else ""
    return PoolingChoice(best, f"{recall[best]:.0%} of synthetic defects above the largest unseen good score{unpooled} "
                               f"({folds} folds of {n} images)", recall)


__all__ = ["POOLING_GRID", "PoolingChoice", "best_share", "choose_pooling", "covariances", "largest_distance", "pool",
           "position_gaussians", "shrinkages", "whiten", "whiteners"]
