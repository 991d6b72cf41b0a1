"""Locally aware patch embeddings shared by the feature-based detectors.

Each tap is averaged over a 3x3 neighbourhood (PatchCore's local aggregation: a patch sees its
surroundings, so small misalignments are not anomalies), coarser taps are upsampled to the
finest tap's grid, and all are concatenated: one embedding per stride-8 patch.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlens.backbones import FeatureExtractor, fuse_conv_bn


def reduce_channels(emb: torch.Tensor, k: int) -> torch.Tensor:
    """PatchCore's channel reduction: average adjacent channels, (n, d, h, w) -> (n, k, h, w).

    The same as adaptive average pooling over the channel axis; written as a reshape-mean when k
    divides d (fast, and exportable to ONNX, which has no adaptive pooling), and as a product with
    the pooling matrix otherwise. Nearest-neighbour search cost is linear in k.
    """
    n, d, h, w = emb.shape
    if d % k == 0:
        return emb.reshape(n, k, d // k, h, w).mean(dim=2)
    return torch.einsum("ndhw,dk->nkhw", emb, torch.from_numpy(pooling_matrix(d, k)).to(emb.dtype))


def pooling_matrix(d: int, k: int) -> np.ndarray:
    """(d, k) weights of adaptive average pooling: output j averages inputs [floor(jd/k), ceil((j+1)d/k)).
    Built in NumPy so an exported graph holds it as a constant."""
    weights = np.zeros((d, k), dtype=np.float32)
    for j in range(k):
        start, stop = (j * d) // k, -(-((j + 1) * d) // k)
        weights[start:stop, j] = 1.0 / (stop - start)
    return weights


class PatchEmbedder(nn.Module):
    """Backbone taps -> one embedding per patch, reduced either by averaging adjacent channels
    (``embed_dim``) or by a learned linear projection (``set_projection``: PCA or random), which
    runs as a 1x1 convolution so the exported graph holds it too."""

    projection: torch.Tensor | None
    projection_bias: torch.Tensor | None

    def __init__(self, extractor: FeatureExtractor, aggregation: int = 3, embed_dim: int | None = None) -> None:
        super().__init__()
        self.extractor = extractor
        self.aggregation = aggregation
        self.embed_dim = embed_dim
        self.register_buffer("projection", None)
        self.register_buffer("projection_bias", None)

    def set_projection(self, matrix: np.ndarray, bias: np.ndarray) -> None:
        """Project (d,)-embeddings x to x @ matrix + bias, (k,)."""
        d, k = matrix.shape
        self.projection = torch.from_numpy(np.ascontiguousarray(matrix.T, dtype=np.float32)).reshape(k, d, 1, 1)
        self.projection_bias = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        taps = self.extractor(images)
        h, w = taps[0].shape[-2:]
        out = []
        for t in taps:
            if self.aggregation > 1:
                t = F.avg_pool2d(t, self.aggregation, stride=1, padding=self.aggregation // 2, count_include_pad=False)
            if t.shape[-2:] != (h, w):
                t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
            out.append(t)
        emb = torch.cat(out, dim=1)
        if self.embed_dim and self.embed_dim < emb.shape[1]:
            emb = reduce_channels(emb, self.embed_dim)
        if self.projection is not None:
            emb = F.conv2d(emb, self.projection, self.projection_bias)
        return emb

    def for_inference(self) -> PatchEmbedder:
        """A copy with batch norms folded and channels-last layout: ~2x faster on CPU."""
        fast = copy.deepcopy(self)
        fuse_conv_bn(fast.extractor)
        return fast.to(memory_format=torch.channels_last).eval()
