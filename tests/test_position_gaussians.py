"""Per-position Gaussians: the batched Ledoit-Wolf equals scikit-learn's, the whitening gives the
Mahalanobis distance, and the pooling share is chosen by synthetic defects: pooled where too few
images leave a position's covariance blind, not pooled where the positions really differ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf, ledoit_wolf_shrinkage

from defectlens.detectors.position_gaussians import (
    POOLING_GRID,
    best_share,
    choose_pooling,
    covariances,
    position_gaussians,
    shrinkages,
)
from defectlens.detectors.simplenet import DiscriminatorScorer


@pytest.mark.parametrize("n", [2, 7, 40])
def test_covariances_are_scikit_learns_ledoit_wolf_at_every_position(n):
    x = np.random.default_rng(n).normal(size=(n, 5, 6)) @ np.random.default_rng(0).normal(size=(6, 6)) + 2.0
    means, covs = covariances(x)
    np.testing.assert_allclose(means, x.mean(axis=0))
    for p in range(5):
        np.testing.assert_allclose(covs[p], ledoit_wolf(x[:, p])[0], rtol=1e-10, atol=1e-12)
    # PaDiM's shrinkages, a chunk of positions at a time (chunks smaller than the grid included)
    expected = [ledoit_wolf_shrinkage(x[:, p]) for p in range(5)]
    np.testing.assert_allclose(shrinkages(x, chunk=2), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(shrinkages(x.astype(np.float32)), expected, rtol=1e-5, atol=1e-7)


def test_one_image_gets_the_identity_at_its_scale():
    x = np.full((1, 3, 4), 2.0)
    _, covs = covariances(x)
    np.testing.assert_allclose(covs, np.broadcast_to(np.eye(4) * 4.0, (3, 4, 4)))


def test_position_gaussians_whiten_to_the_mahalanobis_distance():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(40, 2, 3, 4, generator=gen) @ torch.randn(4, 4, generator=gen) + 5.0
    means, whiteners = position_gaussians(feats)
    assert means.shape == (6, 4) and whiteners.shape == (6, 4, 4)
    x = torch.randn(5, 2, 3, 4, generator=gen) + 5.0
    scorer = DiscriminatorScorer(4, 8, (2, 3)).use_gaussian(means, whiteners)
    z = scorer.whiten(x).reshape(5, 6, 4)
    for p in range(6):
        w = whiteners[p].double()
        precision = w @ w.T
        d = x.reshape(5, 6, 4)[:, p].double() - means[p].double()
        torch.testing.assert_close((z[:, p].double() ** 2).sum(1), torch.einsum("nd,de,ne->n", d, precision, d), rtol=1e-4, atol=1e-4)


def test_pooling_moves_each_covariance_towards_the_mean_over_positions():
    feats = torch.randn(30, 1, 2, 3, generator=torch.Generator().manual_seed(0))
    feats[:, 0, 1] *= 5.0  # the second position varies 25x more
    _, plain = position_gaussians(feats)
    _, pooled = position_gaussians(feats, pooling=0.5)
    spread = [float(torch.linalg.inv(w @ w.T).trace()) for w in (*plain, *pooled)]
    assert spread[2] > spread[0] and spread[3] < spread[1]  # the narrow position widens, the wide one narrows


def _defects_at_one_position(features: np.ndarray, size: float, directions: np.ndarray):
    """Synthetic defects as a test can make them: the given images' grids, moved at one position."""

    def make(ids: np.ndarray, count: int, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        out = features[np.resize(ids, count)].copy()
        n, h, w, d = out.shape
        for k in range(count):
            y, x = rng.integers(h), rng.integers(w)
            out[k, y, x] += size * directions[(y * w + x) % len(directions)]
        return torch.from_numpy(out.astype(np.float32))

    return make


def test_a_covariance_shared_by_every_position_is_pooled_when_each_has_too_few_images():
    """Twelve images in sixteen dimensions: one position's covariance is blind along what its few
    images happened not to vary in, and the mean over twelve positions sees what they share."""
    rng = np.random.default_rng(0)
    d = 16
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    feats = (rng.normal(size=(12, 3, 4, d)) * np.logspace(0, -1, d)) @ rotation.T  # spreads 1 to 0.1
    directions = rng.normal(size=(12, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    choice = choose_pooling(torch.from_numpy(feats.astype(np.float32)), _defects_at_one_position(feats, 3.0, directions), seed=0)
    assert set(choice.recall) == set(POOLING_GRID)
    assert choice.pooling >= 0.5 and choice.recall[choice.pooling] >= choice.recall[0.0] + 0.3, choice.recall


def test_positions_that_really_differ_keep_their_own_covariances():
    rng = np.random.default_rng(1)
    d, positions = 6, 6
    scales = np.full((positions, d), 0.1)
    scales[np.arange(positions), np.arange(positions)] = 10.0  # each position varies along its own axis only
    feats = rng.normal(size=(60, positions, d)) * scales
    # the defects move along an axis that is quiet at that position and loud at the next one
    quiet = np.roll(np.eye(d), 1, axis=0)
    grid = feats.reshape(60, 2, 3, d)
    choice = choose_pooling(torch.from_numpy(grid.astype(np.float32)), _defects_at_one_position(grid, 2.0, quiet), seed=0)
    assert choice.pooling == 0.0, choice.recall
    assert choice.recall[0.0] > choice.recall[max(POOLING_GRID)]


def test_no_choice_without_enough_images_or_synthetic_defects():
    feats = torch.randn(4, 2, 2, 3)
    few = choose_pooling(feats, _defects_at_one_position(feats.numpy(), 3.0, np.eye(3)))
    assert few.pooling == 0.0 and "fewer than" in few.reason and few.recall == {}
    none = choose_pooling(torch.randn(10, 2, 2, 3), lambda ids, count, seed: None)
    assert none.pooling == 0.0 and "no synthetic defects" in none.reason


def test_a_tie_at_the_largest_good_score_is_broken_at_the_next():
    grid = (0.0, 0.5)
    good = np.array([[1.0, 2.0, 10.0], [1.0, 5.0, 10.0]])
    # both shares catch 2 of 4 above 10; above the next good score the unpooled one catches 4, the pooled 2
    synthetic = [np.array([3.0, 4.0, 11.0, 12.0]), np.array([3.0, 4.0, 11.0, 12.0])]
    assert best_share(grid, good, synthetic) == (0.0, {0.0: 0.5, 0.5: 0.5})
    synthetic[1] = np.array([6.0, 7.0, 11.0, 12.0])
    assert best_share(grid, good[::-1], synthetic)[0] == 0.5
    # the largest decides before the next does; a full tie goes to the smaller share
    assert best_share(grid, good, [np.array([11.0, 3.0, 4.0, 5.0]), np.array([11.0, 12.0, 1.0, 1.0])])[0] == 0.5
    assert best_share(grid, good[[0, 0]], [np.array([3.0, 11.0])] * 2)[0] == 0.0
