"""Backbone embeddings kept for the length of one fitting workflow.

Choosing a detector and calibrating it fit many models on the same images: the selection's
candidates share a backbone, and k-fold calibration fits each image into nine of its ten fold
models and then into the final one. The frozen backbone gives every one of those fits the same
embedding for the same pixels, so inside ``caching_embeddings()`` each image's backbone pass
runs once and later fits and scorings reuse it. Only the backbone's output is kept; what a
detector learns on top of it (a PCA projection, channel pooling) is applied afresh, so a fold's
own projection still sees its own fit.

Outside a workflow nothing is cached: inference and the service never hold embeddings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch

MAX_BYTES = 2 << 30  # 2 GiB: about 680 images' 768-channel embeddings at 256 px


class EmbeddingCache:
    """Embeddings by (model key, pixels digest), up to ``max_bytes``.

    When full it keeps what it holds and stores nothing more, rather than evicting: k-fold and
    selection sweep the same images in the same order again and again, which under
    least-recently-used eviction would miss every time once the set outgrows the cache."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._store: dict[tuple, torch.Tensor] = {}

    def embed(self, model_key: Hashable, pixels: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``compute(pixels)`` (n, ...) -> (n, ...), computing only the rows not seen before."""
        keys = [(model_key, tuple(row.shape), _digest(row)) for row in pixels]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[tuple, torch.Tensor] = {}
        if missing:
            computed = compute(pixels[missing] if len(missing) < len(keys) else pixels)
            for i, row in zip(missing, computed, strict=True):
                fresh[keys[i]] = row
                if self.nbytes + row.nbytes <= self.max_bytes:
                    self._store[keys[i]] = row.clone()  # a row of the batch would keep the whole batch alive
                    self.nbytes += row.nbytes
        return torch.stack([fresh[k] if k in fresh else self._store[k] for k in keys])


def _digest(row: torch.Tensor) -> bytes:
    """The pixels themselves are the key, so a path, an array or a tile of one are the same image
    when their pixels are (about 1 ms for 256 x 256, against some 20 ms for the backbone)."""
    return hashlib.blake2b(np.ascontiguousarray(row.numpy()).tobytes(), digest_size=16).digest()


_ACTIVE: ContextVar[EmbeddingCache | None] = ContextVar("defectlens_embedding_cache", default=None)


def active_cache() -> EmbeddingCache | None:
    return _ACTIVE.get()


@contextmanager
def caching_embeddings(max_bytes: int = MAX_BYTES) -> Iterator[EmbeddingCache]:
    """Cache backbone embeddings inside the block; an enclosing block's cache is shared, so a
    selection followed by the final fit and calibration reuse one another's passes."""
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    cache = EmbeddingCache(max_bytes)
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


@contextmanager
def bypassing_cache() -> Iterator[None]:
    """No cache inside the block: for timing what a deployed model costs."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
