from __future__ import annotations

import numpy as np

from defectlens.detectors.coreset import greedy_coreset


def test_covers_every_cluster_first():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 100, (6, 32))
    labels = rng.integers(0, 6, 3000)
    points = (centers[labels] + rng.normal(0, 1, (3000, 32))).astype(np.float32)
    chosen = greedy_coreset(points, 6, projection_dim=16, seed=3)
    assert sorted(set(labels[chosen])) == list(range(6))  # k-center: one per far cluster


def test_reduces_covering_radius_like_exact_greedy():
    # patch features lie near a low-dimensional manifold: a 3-D cube embedded in 64-D
    rng = np.random.default_rng(1)
    points = (rng.uniform(0, 10, (2000, 3)) @ rng.normal(size=(3, 64))).astype(np.float32)
    chosen = greedy_coreset(points, 100, projection_dim=16, seed=0)
    exact = greedy_coreset(points, 100, projection_dim=0, seed=0)
    random_pick = rng.choice(2000, 100, replace=False)

    def radius(idx):
        d = ((points[:, None, :] - points[idx][None]) ** 2).sum(-1)
        return np.sqrt(d.min(1)).max()

    assert radius(chosen) < 0.75 * radius(random_pick)
    assert radius(chosen) < 1.3 * radius(exact)  # the projection costs little coverage
    assert len(set(chosen.tolist())) == 100


def test_deterministic_and_bounded():
    points = np.random.default_rng(2).normal(size=(500, 8)).astype(np.float32)
    a = greedy_coreset(points, 50, seed=7)
    b = greedy_coreset(points, 50, seed=7)
    np.testing.assert_array_equal(a, b)
    assert len(greedy_coreset(points, 10_000)) == 500
