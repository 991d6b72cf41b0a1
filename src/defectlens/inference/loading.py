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
from defectlens.inference.tuning import Tuning, apply_threads, stored_tuning

STORED = "stored"


def load_model(path: str | os.PathLike, runtime: str = "auto", tuning: Tuning | str | None = STORED) -> Bundle:
    """The model at ``path``, ready to score. ``runtime``: ``auto`` puts a .dlens model's backbones in
    ONNX Runtime when they match PyTorch there (the faster path), else keeps PyTorch; ``onnx``
    insists on ONNX Runtime; ``torch`` keeps PyTorch. ``bundle.runtime`` says which it got and why.
    ``tuning``: this machine's stored ``benchmark --tune`` settings (``stored``), these, or none;
    ``bundle.tuning`` holds what was applied."""
    if runtime not in RUNTIMES:
        raise DefectLensError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    path = Path(path)
    if path.suffix.lower() == ".onnx" and runtime == "torch":
        raise DefectLensError(f"{path}: an ONNX export runs in ONNX Runtime only; give the .dlens model for --runtime torch")
    return _load(path, runtime, *_tuning(tuning))


def _tuning(tuning: Tuning | str | None) -> tuple[Tuning | None, str]:
    if tuning == STORED:
        return stored_tuning()
    if tuning is None or isinstance(tuning, Tuning):
        return tuning, ""
    raise DefectLensError(f"tuning must be {STORED!r}, a Tuning or None, got {tuning!r}")


def _load(path: Path, runtime: str, tuning: Tuning | None, why_untuned: str) -> Bundle:
    if tuning is not None:
        apply_threads(tuning.threads, tuning.faiss_threads)  # before the sessions are made: they take the thread count then
    if path.suffix.lower() == ".onnx":
        bundle = load_onnx(path, threads=tuning.threads if tuning else 0)
        bundle.runtime = RuntimeChoice("onnx", "an exported file", 1, kinds=["whole"])
    else:
        bundle = Bundle.load(path)
        if runtime == "torch":
            bundle.runtime = RuntimeChoice("torch", "asked for with --runtime torch")
        else:
            bundle.runtime = accelerate(bundle, path.parent / CACHE_DIR, required=runtime == "onnx")
    bundle.tuning = tuning
    bundle.runtime.tuning = tuning.line() if tuning else f"untuned: {why_untuned}" if why_untuned else ""
    return bundle
