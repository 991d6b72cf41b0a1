"""Detectors: one module per method, all behind one registry and factory."""

from .autoencoder import Autoencoder
from .base import BatchScores, Detector
from .ensemble import EnsembleDetector
from .global_term import GlobalTerm
from .padim import PaDiM
from .patchcore import PatchCore
from .registry import available_detectors, create_detector, create_from_spec, detector_class, register_detector
from .simplenet import SimpleNet
from .supervised import SupervisedClassifier
from .tiling import TiledDetector

__all__ = [
    "Autoencoder", "BatchScores", "Detector", "EnsembleDetector", "GlobalTerm", "PaDiM", "PatchCore", "SimpleNet", "SupervisedClassifier", "TiledDetector",
    "available_detectors", "create_detector", "create_from_spec", "detector_class", "register_detector",
]
