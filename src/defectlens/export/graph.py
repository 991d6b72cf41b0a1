"""A fitted detector and its calibration as one torch module: model-size pixels in, scores out.

Everything after decoding and resizing is inside: normalisation, backbone, patch scoring as
matrix products (nearest neighbour for PatchCore, Mahalanobis for PaDiM, the discriminator for
SimpleNet), upsampling, smoothing, the symmetry term and the normalised score. Decoding and the
antialiased resize stay outside, in the same Python code both paths share, because ONNX has no
resize that matches it to 1e-4.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from defectlens.calibration.record import Calibration
from defectlens.calibration.symmetry import asymmetry_torch
from defectlens.detectors.base import Detector
from defectlens.detectors.feature_based import FeatureDetector
from defectlens.detectors.padim import PaDiM
from defectlens.detectors.patchcore import PatchCore
from defectlens.detectors.simplenet import SimpleNet
from defectlens.errors import DefectLensError

OUTPUTS = ("score", "anomaly_map", "normalised_score")


def exportable(detector: Detector) -> None:
    """Refuse, in one line, what the graph cannot express."""
    if type(detector) not in (PatchCore, PaDiM, SimpleNet):
        raise DefectLensError(f"export supports patchcore, padim and simplenet models; '{detector.name}' models are scored in PyTorch only")
    if isinstance(detector, PatchCore) and detector.reweight:
        raise DefectLensError("export does not support PatchCore's reweighting (reweight=True); refit with reweight=False to export")
    if isinstance(detector, PatchCore) and detector.search != "flat":
        raise DefectLensError(f"export searches exactly, so it would not match this model's approximate '{detector.search}' search; "
                              "refit with search='flat' to export")


class NearestNeighbourScorer(nn.Module):
    """Distance of each patch to its nearest memory-bank patch, by matrix products (no cdist).

    The winner is chosen on |q|^2 - 2 q.m + |m|^2 and its distance measured again as |q - m|,
    exactly as the PyTorch path measures faiss's winner, so the two agree to float rounding.
    """

    def __init__(self, bank: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("bank", torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32)))
        self.register_buffer("bank_sq", self.bank.pow(2).sum(dim=1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        n, d, h, w = emb.shape
        q = emb.permute(0, 2, 3, 1).reshape(-1, d)
        nearest = (self.bank_sq.unsqueeze(0) - 2.0 * q @ self.bank.t()).argmin(dim=1)  # |q|^2 is the same for every candidate
        return (q - self.bank[nearest]).pow(2).sum(dim=1).sqrt().reshape(n, h, w)


class MahalanobisScorer(nn.Module):
    def __init__(self, mean: np.ndarray, precision: np.ndarray, channels: np.ndarray, shape: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32)))
        self.register_buffer("precision", torch.from_numpy(np.ascontiguousarray(precision, dtype=np.float32)))
        self.register_buffer("channels", torch.from_numpy(np.asarray(channels, dtype=np.int64)))
        self.shape = shape

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = emb.index_select(1, self.channels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (n, P, d)
        delta = x - self.mean
        dist = torch.einsum("npd,pde,npe->np", delta, self.precision, delta).clamp_min(0).sqrt()
        return dist.reshape(-1, *self.shape)


class ScoringGraph(nn.Module):
    """(n, 3, size, size) float RGB in [0, 1] -> score (n,), anomaly_map (n, size, size), normalised_score (n,)."""

    def __init__(self, detector: FeatureDetector, calibration: Calibration | None) -> None:
        super().__init__()
        exportable(detector)
        detector._require_fitted()
        self.embedder = detector._fast_embedder
        if isinstance(detector, PatchCore):
            self.patches: nn.Module = NearestNeighbourScorer(detector.memory_bank_)
        elif isinstance(detector, SimpleNet):
            self.patches = detector.scorer_  # the very module PyTorch scoring runs
        else:
            assert isinstance(detector, PaDiM)
            self.patches = MahalanobisScorer(detector.mean_, detector.precision_, detector.channels_, detector.feature_shape_)
        self.head = detector._map_head
        sym = calibration.symmetry if calibration else None
        self.symmetry_axes = sym["axes"] if sym and sym.get("used") else ""
        self.symmetry_weight = float(sym["weight"]) if self.symmetry_axes else 0.0
        self.threshold = float(calibration.image_threshold) if calibration else 0.0
        self.scale = float(calibration.image_scale) if calibration else 1.0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        patch = self.patches(self.embedder(images))
        score = patch.flatten(1).max(dim=1).values
        maps = self.head(patch)
        if self.symmetry_axes:  # Calibration.combine, in the graph
            score = score + self.symmetry_weight * asymmetry_torch(maps, self.symmetry_axes)
        return score, maps, torch.sigmoid((score - self.threshold) / self.scale)
