from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist

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


def test_two_stages_cover_almost_as_well_for_a_fraction_of_the_work():
    # 40 "images" of 500 patches each, drawn from a shared 3-D manifold with per-image offsets
    rng = np.random.default_rng(4)
    basis = rng.normal(size=(3, 32))
    points = np.concatenate([(rng.uniform(0, 10, (500, 3)) + rng.normal(0, 0.5, 3)) @ basis for _ in range(40)]).astype(np.float32)
    one_pass = greedy_coreset(points, 200, projection_dim=0, seed=0, group_size=500, global_max=None)
    two_stage = greedy_coreset(points, 200, projection_dim=0, seed=0, group_size=500, global_max=10_000)
    assert len(set(two_stage.tolist())) == 200 and set(two_stage.tolist()) != set(one_pass.tolist())

    def radius(idx):
        return cdist(points, points[idx]).min(axis=1).max()

    assert radius(two_stage) < 1.25 * radius(one_pass)
    np.testing.assert_array_equal(two_stage, greedy_coreset(points, 200, projection_dim=0, seed=0, group_size=500, global_max=10_000))
    # below the size, or without image groups, one pass runs
    np.testing.assert_array_equal(one_pass, greedy_coreset(points, 200, projection_dim=0, seed=0, group_size=500, global_max=20_000))
    np.testing.assert_array_equal(one_pass, greedy_coreset(points, 200, projection_dim=0, seed=0, global_max=10_000))
