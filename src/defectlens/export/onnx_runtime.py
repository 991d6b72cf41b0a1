"""Scoring with an exported ONNX file in ONNX Runtime, behind the same Detector interface, so the
Inspector turns its scores into the same Inspection records (verdict, mask, regions)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from defectlens.bundle import Bundle
from defectlens.calibration.record import Calibration
from defectlens.data.images import ImageInput, ModelSize, normalise_size
from defectlens.detectors.base import Detector, PixelScores, Stopwatch, good_images_only
from defectlens.errors import BundleError, DefectLensError
from defectlens.export.onnx_export import FORMAT, META_KEY


def session(model: str | bytes, threads: int = 0):
    """An ONNX Runtime session on the CPU, set up as every DefectLens graph runs (``threads`` 0:
    as many as torch uses, so both runtimes share the cores alike)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ONNX Runtime's threads spin while they wait for work by default: beside the decoding
    # threads and the scoring that follows each graph, spinning took the cores from both and
    # made a model slower than in PyTorch
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OnnxDetector(Detector):
    """A fitted model in an ONNX file; scores already include the calibration's symmetry term."""

    name = "onnx"
    scores_include_calibration = True

    def __init__(self, path: str = "", image_size: ModelSize = 256, batch_size: int = 8, threads: int = 0, verbose: bool = False) -> None:
        self.path = path
        self.image_size = image_size
        self.batch_size = batch_size
        self.threads = threads
        self.verbose = verbose

    def load(self) -> OnnxDetector:
        try:
            self.session_ = session(self.path, self.threads)
        except Exception as exc:  # noqa: BLE001 -- ONNX Runtime raises its own exception types
            raise BundleError(f"{self.path}: ONNX Runtime cannot load it ({type(exc).__name__})") from None
        return self

    def fit(self, images: Sequence[ImageInput], labels: Sequence[int] | None = None) -> OnnxDetector:
        good_images_only(self, labels)
        raise DefectLensError("an exported ONNX model cannot be fitted; fit the .dlens model and export again")

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, watch: Stopwatch | None = None) -> PixelScores:
        watch = watch or Stopwatch()
        score, maps, _ = self.session_.run(None, {"images": np.ascontiguousarray(pixels.numpy(), dtype=np.float32)})
        watch.lap("graph")
        return PixelScores(score, maps, None)

    def get_state(self) -> dict[str, np.ndarray]:
        raise DefectLensError("an exported ONNX model has no bundle state")

    def set_state(self, state: dict[str, np.ndarray]) -> OnnxDetector:
        raise DefectLensError("an exported ONNX model has no bundle state")


def load_onnx(path: str | os.PathLike, batch_size: int = 8, threads: int = 0) -> Bundle:
    """An exported model as a Bundle the Inspector accepts (no defect typer: heuristic types only)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: model file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 -- protobuf's decode errors have no common base
        raise BundleError(f"{path}: not an ONNX model, or truncated ({type(exc).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    try:
        meta = json.loads(props[META_KEY])
        assert meta["format"] == FORMAT
    except (KeyError, ValueError, AssertionError, TypeError):
        raise BundleError(f"{path}: an ONNX model, but not one exported by DefectLens") from None
    det = OnnxDetector(str(path), normalise_size(meta["image_size"]), batch_size, threads).load()
    calibration = Calibration.from_dict(meta["calibration"]) if meta.get("calibration") else None
    return Bundle(det, calibration, {**meta.get("metadata", {}), "exported_from": meta["detector"]}, None, meta["source_checksum"])
