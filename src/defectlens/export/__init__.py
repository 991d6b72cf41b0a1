"""Exports of fitted models that score exactly like training: ONNX graphs and their runtime."""

from .graph import ScoringGraph, exportable
from .onnx_export import export_onnx
from .onnx_runtime import OnnxDetector, load_onnx

__all__ = ["OnnxDetector", "ScoringGraph", "export_onnx", "exportable", "load_onnx"]
