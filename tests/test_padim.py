"""PaDiM: streaming Gaussians equal the direct computation; distances behave as Mahalanobis."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectlens import create_detector, load_dataset
from defectlens.metrics import image_auroc


@pytest.fixture(scope="module")
def fitted(tiny_dataset):
    ds = load_dataset(tiny_dataset, validation_fraction=0.0)
    return create_detector("padim", image_size=64, n_features=24, batch_size=3).fit(ds.train_good), ds


def test_streamed_mean_and_covariance_match_the_direct_computation(fitted):
    det, ds = fitted
    x = np.concatenate([det._select(emb) for _, emb in det._iter_embeddings(ds.train_good)])  # (n, P, d)
    np.testing.assert_allclose(det.mean_, x.mean(axis=0), rtol=1e-5, atol=1e-6)
    p = 5  # any position: rebuild its shrunk covariance from the data and the stored coefficient
    cov = np.cov(x[:, p].T)
    a = float(det.shrinkage_[p])
    d = cov.shape[0]
    scale = np.trace(cov) / d
    expected = (1 - a) * cov + a * scale * np.eye(d) + 1e-6 * scale * np.eye(d)
    np.testing.assert_allclose(np.linalg.inv(det.precision_[p].astype(np.float64)), expected, rtol=2e-3, atol=1e-5)
    assert np.all((det.shrinkage_ >= 0) & (det.shrinkage_ <= 1))
    assert det.precision_.flags.c_contiguous  # else every scorer made from it copies the whole precision


def test_batch_size_does_not_change_the_model(fitted):
    det, ds = fitted
    other = create_detector("padim", image_size=64, n_features=24, batch_size=1).fit(ds.train_good)
    np.testing.assert_allclose(other.mean_, det.mean_, rtol=1e-5, atol=1e-6)
    # the backbone's float32 sums differ in the last bits between batch sizes; compare covariances,
    # which inversion does not amplify
    cov_a, cov_b = np.linalg.inv(other.precision_.astype(np.float64)), np.linalg.inv(det.precision_.astype(np.float64))
    np.testing.assert_allclose(cov_a, cov_b, rtol=1e-3, atol=1e-4 * np.abs(cov_b).max())


def test_padim_finds_the_synthetic_defects(fitted):
    det, ds = fitted
    scores, maps = det.score([s.path for s in ds.test])
    assert image_auroc(np.array([s.label for s in ds.test]), scores) >= 0.9
    assert maps.shape == (len(ds.test), 64, 64)
    emb = det.score_pixels(torch.zeros(1, 3, 64, 64)).features
    assert emb.shape[:2] == (1, det.embedder_(torch.zeros(1, 3, 64, 64)).shape[1])


def test_random_channel_subset_is_the_papers_option(tiny_dataset):
    ds = load_dataset(tiny_dataset, validation_fraction=0.0)
    det = create_detector("padim", image_size=64, n_features=24, channel_selection="random", random_state=3).fit(ds.train_good[:6])
    full = det.embedder_(torch.zeros(1, 3, 64, 64)).shape[1]
    assert full > 24 and len(det.channels_) == 24 and len(set(det.channels_.tolist())) == 24 and det.channels_.max() < full
    with pytest.raises(Exception, match="channel_selection"):
        create_detector("padim", channel_selection="best").fit(ds.train_good[:2])


def test_ensemble_fuses_standardised_members(tiny_dataset):
    ds = load_dataset(tiny_dataset, validation_fraction=0.0)
    ens = create_detector("ensemble", detector="padim", backbones="mobilenet_v2,efficientnet_lite0",
                          detector_params={"n_features": 24}, image_size=64).fit(ds.train_good)
    assert [m.backbone for m in ens.members_] == ["mobilenet_v2", "efficientnet_lite0"] and ens.norm_.shape == (2, 4)
    paths = [s.path for s in ds.test]
    scores, maps = ens.score(paths)
    # the fused score is the mean of each member's standardised score
    expected = np.mean([(m.score(paths)[0] - n[0]) / n[1] for m, n in zip(ens.members_, ens.norm_, strict=True)], axis=0)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert image_auroc(np.array([s.label for s in ds.test]), scores) >= 0.9
    with pytest.raises(Exception, match="at least two members"):
        create_detector("ensemble", backbones="mobilenet_v2").fit(ds.train_good[:2])


def test_precision_is_the_inverse_even_after_the_thread_count_was_set():
    """torch's batched LU failed on 160-channel covariances once torch.set_num_threads had run (as
    loading a tuned model does), so a later PaDiM fit in that process raised."""
    torch.set_num_threads(torch.get_num_threads())
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((40, 8, 160)) * np.linspace(0.5, 2.0, 160)  # (images, positions, channels)
    cov = np.einsum("npd,npe->pde", sample, sample) / 40
    detector = create_detector("padim")
    precision = detector._shrunk_precision(cov.copy(), sample)
    alpha = detector.shrinkage_.astype(np.float64)[:, None, None]
    scale = np.trace(cov, axis1=1, axis2=2)[:, None, None] / 160
    shrunk = (1 - alpha) * cov + (alpha * scale + 1e-6 * scale) * np.eye(160)  # Ledoit-Wolf toward a scaled identity
    assert precision.flags.c_contiguous and np.all((alpha > 0) & (alpha < 1))
    np.testing.assert_allclose(precision @ shrunk, np.broadcast_to(np.eye(160), shrunk.shape), atol=1e-6)
