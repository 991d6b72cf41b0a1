"""The anomaly-map head and the patch embedder compute their linear steps in a cheaper order;
these tests hold them to the plain definitions, computed by other libraries' code."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from defectlens.backbones import create_backbone
from defectlens.detectors.anomaly_map import AnomalyMapHead
from defectlens.detectors.features import PatchEmbedder


def _gaussian(sigma: float, side: int) -> np.ndarray:
    """The Gaussian's taps out to 4 sigma, cut at what reflecting a side of ``side`` allows, summing to 1."""
    radius = min(int(4 * sigma + 0.5), side - 1)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return taps / taps.sum()


@pytest.mark.parametrize(("size", "sigma", "grid"), [(256, 4.0, (32, 32)), ((96, 240), 4.0, (12, 30)), (64, 0.0, (8, 8)),
                                                     (64, 2.0, (64, 64)), (20, 8.0, (5, 5)), ((6, 20), 4.0, (3, 5)), (16, 2.0, (32, 32))])
def test_map_head_is_bilinear_resizing_then_a_mirrored_gaussian(size, sigma, grid):
    torch.manual_seed(0)
    patches = torch.rand(2, *grid) * 5
    head = AnomalyMapHead(size, sigma)
    with torch.inference_mode():
        maps = head(patches).numpy()
    assert not head.operators(*grid)[0].is_inference()  # usable outside inference mode too
    expected = F.interpolate(patches.unsqueeze(1), size=head.size, mode="bilinear", align_corners=False).squeeze(1).numpy()
    if sigma > 0:  # torch's "reflect" padding is SciPy's "mirror"
        for axis, side in ((1, head.size[0]), (2, head.size[1])):
            expected = ndimage.correlate1d(expected.astype(np.float64), _gaussian(sigma, side), axis=axis, mode="mirror")
    assert maps.shape == (2, *head.size)
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


@pytest.mark.parametrize("kind", ["expanded", "blocks"])
def test_projecting_each_tap_first_equals_projecting_the_concatenation(kind):
    torch.manual_seed(0)
    extractor, _ = create_backbone("mobilenet_v2", kind=kind)
    embedder = PatchEmbedder(extractor.eval())
    images = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        full = embedder(images)  # no projection: the concatenated, averaged, upsampled taps
        d = full.shape[1]
        rng = np.random.default_rng(0)
        matrix, bias = rng.standard_normal((d, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
        embedder.set_projection(matrix, bias)
        projected = embedder(images).numpy()
    expected = np.einsum("ndhw,dk->nkhw", full.numpy().astype(np.float64), matrix) + bias[None, :, None, None]
    np.testing.assert_allclose(projected, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
