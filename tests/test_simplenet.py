"""SimpleNet: early stopping keeps the best epoch, the time budget holds, the state round-trips,
negatives are changed in coherent blobs, and the inference copy scores like the trained one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectlens import create_detector, load_dataset
from defectlens.detectors.position_gaussians import POOLING_GRID
from defectlens.detectors.simplenet import DiscriminatorScorer, SimpleNet, perlin_masks
from defectlens.errors import DefectLensError

SMALL = {"image_size": 64, "embed_dim": 16, "hidden": 32}


@pytest.fixture(scope="module")
def ds(tiny_dataset):
    return load_dataset(tiny_dataset, validation_fraction=0.2)


def test_early_stopping_keeps_the_best_epoch(ds, monkeypatch):
    """Scripted held-out AUROCs: the best (epoch 1) must be the weights kept, and training must
    stop ``patience`` epochs after it."""
    scripted = iter([0.6, 0.9, 0.8, 0.7, 0.85, 0.95, 0.99])
    seen: list[dict[str, np.ndarray]] = []

    def fake_validate(net, x, y):
        seen.append(net.folded().arrays())
        return next(scripted)

    monkeypatch.setattr(SimpleNet, "_validate", staticmethod(fake_validate))
    det = create_detector("simplenet", **SMALL, max_epochs=20, patience=3).fit(ds.train_good)
    assert det.best_epoch_ == 1
    assert len(det.history_["val_auroc"]) == 1 + 1 + 3  # stopped 3 epochs after the best
    kept = det.scorer_.arrays()
    kept["adaptor.weight"] = kept["adaptor.weight"] * det.input_scale_  # trained on features / input_scale_
    assert set(kept) == set(seen[1])
    for key, value in seen[1].items():
        np.testing.assert_allclose(kept[key], value, rtol=1e-6)
    assert any(not np.array_equal(kept[k], seen[-1][k]) for k in kept), "the last epoch's weights differ from the best's"


def test_time_budget_is_honoured(ds):
    det = create_detector("simplenet", **SMALL, max_epochs=10_000, patience=10_000, max_train_seconds=1.0).fit(ds.train_good)
    epochs = len(det.history_["val_auroc"])
    assert 1 <= epochs < 10_000
    per_epoch = det.train_seconds_ / epochs
    assert det.train_seconds_ <= 1.0 + 2 * per_epoch  # it stops before an epoch would overrun, give or take one


def test_state_round_trip_scores_identically(ds):
    det = create_detector("simplenet", **SMALL, max_epochs=3).fit(ds.train_good)
    assert det.scorer_.whitener is not None and det.scorer_.quad is not None  # the default: with per-position Gaussians
    again = SimpleNet(**det.get_params()).set_state({k: np.array(v) for k, v in det.get_state().items()})
    paths = [s.path for s in ds.test]
    s0, m0 = det.score(paths)
    s1, m1 = again.score(paths)
    np.testing.assert_array_equal(s0, s1)
    np.testing.assert_array_equal(m0, m1)
    assert again.best_epoch_ == det.best_epoch_ and again.n_train_images_ == len(ds.train_good)


def test_perlin_masks_are_spatially_coherent_blobs():
    masks = perlin_masks(64, 32, 32, torch.Generator().manual_seed(0), full_share=0.0)
    assert masks.shape == (64, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.flatten(1).sum(1) > 0).all(), "every negative has somewhere noised"
    partial = masks[masks.flatten(1).mean(1) < 1]
    p = float(partial.mean())
    # a noised patch's neighbour is noised too far more often than the density alone would have it
    pairs = [(partial[:, 1:], partial[:, :-1]), (partial[:, :, 1:], partial[:, :, :-1])]
    both = sum(float((a * b).sum()) for a, b in pairs)
    first = sum(float(b.sum()) for _, b in pairs)
    assert 0.05 < p < 0.6 and both / first > 0.6 > p + 0.3
    again = perlin_masks(64, 32, 32, torch.Generator().manual_seed(0), full_share=0.0)
    assert torch.equal(masks, again), "masks are reproducible from the seed"
    everywhere = perlin_masks(200, 8, 8, torch.Generator().manual_seed(1), full_share=0.25)
    assert 0.1 < float((everywhere.flatten(1).mean(1) == 1).float().mean()) < 0.45  # about a quarter noised all over


@pytest.mark.parametrize("frequencies", [0, 2])
def test_folded_scorer_scores_like_the_trained_one(frequencies):
    """The inference copy (positional term precomputed) and its saved arrays score as training did."""
    gen = torch.Generator().manual_seed(0)
    net = DiscriminatorScorer(8, 16, (4, 5), frequencies).reset(gen)
    with torch.no_grad():
        net.adaptor.weight.add_(0.1 * torch.randn(8, 8, generator=gen))
    emb = torch.randn(3, 8, 4, 5, generator=gen)
    with torch.no_grad():
        expected = net(emb)
        folded = net.folded()
        torch.testing.assert_close(folded(emb), expected, rtol=1e-6, atol=1e-6)
        restored = DiscriminatorScorer.from_arrays(folded.arrays(), (4, 5))
        torch.testing.assert_close(restored(emb), folded(emb), rtol=0, atol=0)
        rows = net.adaptor(emb.permute(0, 2, 3, 1))
        torch.testing.assert_close(net.discriminate(rows), expected)
    assert expected.shape == (3, 4, 5)
    assert (folded.positional_bias is not None) == (frequencies > 0)


def test_a_model_saved_before_the_gaussians_loads_without_them_and_scores_as_before(ds):
    paths = [s.path for s in ds.test]
    plain = create_detector("simplenet", **SMALL, max_epochs=3, gaussian=False).fit(ds.train_good)
    state = plain.get_state()
    assert plain.scorer_.whitener is None and "scorer.whitener" not in state
    old = SimpleNet(**{k: v for k, v in plain.get_params().items() if k != "gaussian"}).set_state(state)  # saved before the setting
    assert old.gaussian is False and old.scorer_.whitener is None
    np.testing.assert_array_equal(old.score(paths)[0], plain.score(paths)[0])


def test_pooling_is_chosen_per_fit_or_taken_as_given_and_kept_in_the_saved_model(ds):
    paths = [s.path for s in ds.test]
    auto = create_detector("simplenet", **SMALL, max_epochs=2).fit(ds.train_good)
    assert auto.pooling_ in POOLING_GRID and set(auto.pooling_recall_) == set(POOLING_GRID)
    assert auto.pooling_recall_[auto.pooling_] == max(auto.pooling_recall_.values())
    given = create_detector("simplenet", **SMALL, max_epochs=2, pooling="0.3").fit(ds.train_good)  # as --pooling 0.3 passes it
    assert given.pooling_ == 0.3 and given.pooling_recall_ == {}
    state = given.get_state()
    restored = SimpleNet(**given.get_params()).set_state(state)
    assert restored.pooling_ == 0.3
    np.testing.assert_array_equal(restored.score(paths)[0], given.score(paths)[0])
    del state["pooling"]  # a model saved before the pooling existed had none
    assert SimpleNet(**given.get_params()).set_state(state).pooling_ == 0.0


@pytest.mark.parametrize("pooling", ["sometimes", 1.5, -0.1])
def test_a_pooling_that_is_neither_auto_nor_a_share_is_refused(ds, pooling):
    with pytest.raises(DefectLensError, match="pooling must be 'auto' or a share"):
        create_detector("simplenet", **SMALL, pooling=pooling).fit(ds.train_good)
