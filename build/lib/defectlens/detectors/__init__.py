"""Detectors: one module per method, all behind one registry and factory."""

from defectlens.detectors.autoencoder import Autoencoder
from defectlens.detectors.base import BatchScores, Detector
from defectlens.detectors.ensemble import EnsembleDetector
from defectlens.detectors.global_term import GlobalTerm
from defectlens.detectors.padim import PaDiM
from defectlens.detectors.patchcore import PatchCore
from defectlens.detectors.registry import available_detectors, create_detector, create_from_spec, detector_class, register_detector
from defectlens.detectors.simplenet import SimpleNet
from defectlens.detectors.supervised import SupervisedClassifier
from defectlens.detectors.tiling import TiledDetector

__all__ = [
    "Autoencoder", "BatchScores", "Detector", "EnsembleDetector", "GlobalTerm", "PaDiM", "PatchCore", "SimpleNet", "SupervisedClassifier", "TiledDetector",
    "available_detectors", "create_detector", "create_from_spec", "detector_class", "register_detector",
]
