"""A fitted detector and its calibration as one torch module: model-size pixels in, scores out.

Everything after decoding and resizing is inside: normalisation, backbone, patch scoring,
upsampling, smoothing, the symmetry term and the normalised score. The patch scoring is each
detector's own module (Mahalanobis for PaDiM and the discriminator for SimpleNet, the very modules
their PyTorch scoring runs; for PatchCore the matrix-product form of the search that faiss does in
PyTorch), so no maths is written twice. Decoding and the
antialiased resize stay outside, in the same Python code both paths share, because ONNX has no
resize that matches it to 1e-4.
"""

from __future__ import annotations

import torch
from torch import nn

from defectlens.calibration.record import Calibration, DecisionRule
from defectlens.detectors.base import Detector
from defectlens.detectors.feature_based import FeatureDetector
from defectlens.detectors.padim import PaDiM
from defectlens.detectors.patchcore import NearestNeighbourScorer, PatchCore
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


class ScoringGraph(nn.Module):
    """(n, 3, height, width) float RGB in [0, 1] -> score (n,), anomaly_map (n, height, width), normalised_score (n,)."""

    def __init__(self, detector: FeatureDetector, calibration: Calibration | None, with_features: bool = False) -> None:
        super().__init__()
        self.with_features = with_features  # a fourth output, the patch embeddings (n, d, h, w): for region typing and the global term
        exportable(detector)
        detector._require_fitted()
        self.embedder = detector._fast_embedder
        if isinstance(detector, PatchCore):
            self.patches: nn.Module = NearestNeighbourScorer(detector.memory_bank_)
        elif isinstance(detector, SimpleNet):
            self.patches = detector.scorer_  # the very module PyTorch scoring runs
        else:
            assert isinstance(detector, PaDiM)
            self.patches = detector.scorer()  # the very module PyTorch scoring runs
        self.head = detector._map_head
        self.rule = calibration.rule() if calibration else DecisionRule(0.0, 1.0)  # the Inspector's rule, traced

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        emb = self.embedder(images)
        patch = self.patches(emb)
        score = patch.flatten(1).max(dim=1).values
        maps = self.head(patch)
        score = self.rule.combine(score, maps)  # the symmetry term, when calibration chose it
        return (score, maps, self.rule.normalise(score, torch), *((emb,) if self.with_features else ()))
