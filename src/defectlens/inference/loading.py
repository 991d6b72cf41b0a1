"""One entry point for every model file a line runs: a ``.dlens`` bundle, or an ``.onnx`` export
scored by ONNX Runtime behind the same Bundle interface. It lives here, above both, so that the
model file format (``bundle``) never has to know about the export that is built from it."""

from __future__ import annotations

import os
from pathlib import Path

from defectlens.bundle import Bundle
from defectlens.errors import DefectLensError
from defectlens.export import load_onnx
from defectlens.export.runtime import CACHE_DIR, RUNTIMES, RuntimeChoice, accelerate


def load_model(path: str | os.PathLike, runtime: str = "auto") -> Bundle:
    """The model at ``path``, ready to score. ``runtime``: ``auto`` puts a .dlens model's backbones in
    ONNX Runtime when they match PyTorch there (the faster path), else keeps PyTorch; ``onnx``
    insists on ONNX Runtime; ``torch`` keeps PyTorch. ``bundle.runtime`` says which it got and why."""
    if runtime not in RUNTIMES:
        raise DefectLensError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if runtime == "torch":
            raise DefectLensError(f"{path}: an ONNX export runs in ONNX Runtime only; give the .dlens model for --runtime torch")
        bundle = load_onnx(path)
        bundle.runtime = RuntimeChoice("onnx", "an exported file", 1, kinds=["whole"])
        return bundle
    bundle = Bundle.load(path)
    if runtime == "torch":
        bundle.runtime = RuntimeChoice("torch", "asked for with --runtime torch")
    else:
        bundle.runtime = accelerate(bundle, path.parent / CACHE_DIR, required=runtime == "onnx")
    return bundle
