"""Greedy k-center coreset selection, fast on CPU.

PatchCore keeps a subset of training patches that covers all of them: each step adds the
patch farthest from the subset so far. Distances are computed in a random low-dimensional
projection (Johnson-Lindenstrauss: distances are preserved well enough to rank the farthest
point), and each step is one matrix-vector product over all points plus an elementwise
minimum, so the per-step cost is a single pass over memory with no Python loop over points.

That is still n x n_select work: quadratic in the patch count at a fixed ratio (412 s for 100 images at
1024 px). Above ``global_max`` patches the selection runs in two stages instead: a coreset of each
image's own patches (small, cache-resident), then the global coreset of their union. The union
of per-part k-center coresets is a composable coreset (Indyk et al., PODS 2014): the second
stage's covering radius stays within a small constant factor of the one-stage result, for a
fraction of the work. PatchCore's ``coreset_global_max`` sets the size; None keeps one pass.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

FIRST_STAGE_FACTOR = 10  # each image keeps 10x the final ratio of its own patches


def greedy_coreset(
    features: np.ndarray,
    n_select: int,
    projection_dim: int = 64,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    group_size: int = 0,
    global_max: int | None = None,
) -> np.ndarray:
    """Indices of ``n_select`` rows of ``features`` chosen by approximate greedy k-center.

    ``group_size``: rows per image. Given, and with more than ``global_max`` rows, the
    selection runs in two stages (see the module docstring). ``progress`` is called with the
    number of new selections since the last call.
    """
    n, d = features.shape
    n_select = int(min(max(n_select, 1), n))
    if n_select == n:
        return np.arange(n)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    if projection_dim and projection_dim < d:
        proj = torch.randn(d, projection_dim, generator=gen) / projection_dim**0.5
        x = x @ proj
    per_group = int(np.ceil(group_size * min(1.0, FIRST_STAGE_FACTOR * n_select / n))) if group_size else 0
    if global_max is not None and n > global_max and group_size and n % group_size == 0 and per_group < group_size:
        candidates = np.concatenate([
            start + _greedy(x[start : start + group_size], per_group, gen) for start in range(0, n, group_size)
        ])
        return candidates[_greedy(x[torch.from_numpy(candidates)], n_select, gen, progress)]
    return _greedy(x, n_select, gen, progress)


def _greedy(x: torch.Tensor, n_select: int, gen: torch.Generator, progress: Callable[[int], None] | None = None) -> np.ndarray:
    n = x.shape[0]
    norms = (x * x).sum(1)
    min_dist = torch.full((n,), float("inf"))
    dist = torch.empty(n)
    selected = np.empty(n_select, dtype=np.int64)
    idx = int(torch.randint(n, (1,), generator=gen))
    report_every = max(1, n_select // 100)
    for step in range(n_select):
        selected[step] = idx
        # squared distance to the new center: |x|^2 - 2 x.c + |c|^2
        torch.mv(x, x[idx], out=dist)
        dist.mul_(-2.0).add_(norms).add_(norms[idx])
        torch.minimum(min_dist, dist, out=min_dist)
        idx = int(torch.argmax(min_dist))
        if progress is not None and (step + 1) % report_every == 0:
            progress(report_every)
    return selected


def extend_coreset(min_dist_sq: np.ndarray, candidates: np.ndarray, radius: float) -> np.ndarray:
    """Indices of the ``candidates`` rows to add to a coreset so that every candidate lies within
    ``radius`` of it: the greedy k-center step over bank + new, started from the bank.

    ``min_dist_sq`` is each candidate's squared distance to the existing coreset. Candidates the
    coreset already covers add nothing, so a good image like the ones fitted on adds no patches
    while a new look (new material, a moved lamp) adds the few patches that cover it.
    """
    x = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.float32))
    min_dist = torch.from_numpy(np.asarray(min_dist_sq, dtype=np.float32).copy())
    norms = (x * x).sum(1)
    dist = torch.empty(len(x))
    limit = float(radius) ** 2
    selected: list[int] = []
    while len(selected) < len(x):
        idx = int(torch.argmax(min_dist))
        if float(min_dist[idx]) <= limit:
            break
        selected.append(idx)
        torch.mv(x, x[idx], out=dist)
        dist.mul_(-2.0).add_(norms).add_(norms[idx]).clamp_(min=0.0)
        torch.minimum(min_dist, dist, out=min_dist)
    return np.asarray(selected, dtype=np.int64)
