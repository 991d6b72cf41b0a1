"""The embedding cache of fitting workflows: each image's backbone pass once, the same models."""

from __future__ import annotations

import numpy as np
import torch

from defectlens import create_detector
from defectlens.data import load_dataset
from defectlens.detectors.embedding_cache import EmbeddingCache, active_cache, bypassing_cache, caching_embeddings
from defectlens.workflows.fitting import kfold_scores

SMALL = {"image_size": 64}


def _doubling(calls: list[int]):
    def compute(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x * 2
    return compute


def test_only_unseen_rows_are_computed_and_rows_keep_their_order():
    cache, calls = EmbeddingCache(), []
    a, b, c = (torch.full((3, 4, 4), v) for v in (1.0, 2.0, 3.0))
    assert torch.equal(cache.embed("m", torch.stack([a, b]), _doubling(calls)), torch.stack([a, b]) * 2)
    out = cache.embed("m", torch.stack([c, a, b]), _doubling(calls))
    assert torch.equal(out, torch.stack([c, a, b]) * 2)
    assert calls == [2, 1] and (cache.hits, cache.misses) == (2, 3)
    cache.embed("other model", torch.stack([a]), _doubling(calls))  # another backbone: its own entry
    assert calls == [2, 1, 1]


def test_a_full_cache_keeps_what_it_holds_and_still_answers():
    row = torch.zeros(3, 4, 4)
    cache, calls = EmbeddingCache(max_bytes=row.nbytes), []
    rows = torch.stack([row, row + 1])
    assert torch.equal(cache.embed("m", rows, _doubling(calls)), rows * 2)
    assert cache.nbytes == row.nbytes
    cache.embed("m", rows, _doubling(calls))
    assert calls == [2, 1]  # the first row was kept, the second is computed again


def test_the_cache_lives_only_inside_its_block_and_nested_blocks_share_it():
    assert active_cache() is None
    with caching_embeddings() as outer:
        with caching_embeddings() as inner:
            assert inner is outer
        with bypassing_cache():
            assert active_cache() is None
        assert active_cache() is outer
    assert active_cache() is None


def test_cached_fits_score_as_uncached_ones_and_embed_each_image_once(tiny_dataset):
    images = load_dataset(tiny_dataset, validation_fraction=0.0).train_good[:8]
    for name in ("patchcore", "padim"):  # PatchCore's PCA projection is fitted per fold, after the cache
        plain, _ = kfold_scores(create_detector(name, **SMALL), images, folds=4)
        with caching_embeddings() as cache:
            cached, _ = kfold_scores(create_detector(name, **SMALL), images, folds=4)
        np.testing.assert_allclose(cached.scores, plain.scores, rtol=1e-4)
        assert cache.misses == len(images)  # fold fits and left-out scoring: one backbone pass per image
        assert cache.hits >= 3 * len(images)
