"""Exports of fitted models that score exactly like training: ONNX graphs and their runtime."""

from defectlens.export.graph import ScoringGraph, exportable
from defectlens.export.onnx_export import export_onnx
from defectlens.export.onnx_runtime import OnnxDetector, load_onnx
from defectlens.export.parity import PARITY, Parity, export_checked

__all__ = ["PARITY", "OnnxDetector", "Parity", "ScoringGraph", "export_checked", "export_onnx", "exportable", "load_onnx"]
