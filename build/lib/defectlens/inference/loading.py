"""One entry point for every model file a line runs: a ``.dlens`` bundle, or an ``.onnx`` export
scored by ONNX Runtime behind the same Bundle interface. It lives here, above both, so that the
model file format (``bundle``) never has to know about the export that is built from it."""

from __future__ import annotations

import os
from pathlib import Path

from defectlens.bundle import Bundle
from defectlens.export import load_onnx


def load_model(path: str | os.PathLike) -> Bundle:
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return load_onnx(path)
    return Bundle.load(path)
