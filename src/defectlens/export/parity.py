"""An export is only kept if it scores like the model it came from: the check `export` runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defectlens.bundle import Bundle
from defectlens.data.images import ImageInput, ModelSize, size_hw
from defectlens.errors import DefectLensError
from defectlens.export.onnx_export import export_onnx
from defectlens.export.onnx_runtime import load_onnx

PARITY = 1e-4  # largest difference from PyTorch, in score and in map, an export may show


def check_images(size: ModelSize, n: int = 4) -> list[np.ndarray]:
    """Seeded noise images at the model size (RGB) to compare a graph with PyTorch on, when no real ones are given."""
    return list(np.random.default_rng(0).random((n, *size_hw(size), 3), dtype=np.float32))


@dataclass
class Parity:
    path: Path
    images: int
    score_diff: float
    map_diff: float


def export_checked(bundle: Bundle, path: str | os.PathLike, images: Sequence[ImageInput] = (), parity: float = PARITY) -> Parity:
    """Export ``bundle`` to ONNX and compare both on ``images`` (default: 4 random ones); a file
    that disagrees by more than ``parity`` is removed and reported, never left to be deployed."""
    path = Path(path)
    export_onnx(bundle, path)
    exported = load_onnx(path)
    size = bundle.detector.image_size
    images = list(images) or check_images(size)
    cal = bundle.calibration
    s_ref, m_ref = bundle.detector.score(images)
    s_onnx, m_onnx = exported.detector.score(images)
    score_diff = float(np.abs(bundle.detector.decision_scores(s_ref, m_ref, cal) - exported.detector.decision_scores(s_onnx, m_onnx, cal)).max())
    result = Parity(path, len(images), score_diff, float(np.abs(m_ref - m_onnx).max()))
    if max(result.score_diff, result.map_diff) > parity:
        path.unlink()
        raise DefectLensError(f"{path}: the export disagrees with PyTorch by more than {parity:g}; not kept")
    return result
