"""Exports of fitted models that score exactly like training: ONNX graphs and their runtime."""

from defectlens.export.graph import ScoringGraph, exportable
from defectlens.export.onnx_export import export_onnx
from defectlens.export.onnx_runtime import OnnxDetector, load_onnx

__all__ = ["OnnxDetector", "ScoringGraph", "export_onnx", "exportable", "load_onnx"]
