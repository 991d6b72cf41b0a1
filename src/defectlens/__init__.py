"""DefectLens: learn a good part from photos of good parts, then find defects in new ones.

The public names load on first use (PEP 562), so ``import defectlens`` and ``defectlens --help``
do not pay for torch and faiss until a model is needed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from defectlens._version import __version__

_PUBLIC = {
    "Bundle": "defectlens.bundle",
    "DefectLensError": "defectlens.errors",
    "Inspection": "defectlens.inference.inspection",
    "Inspector": "defectlens.inference.inspector",
    "Region": "defectlens.inference.inspection",
    "available_detectors": "defectlens.detectors",
    "create_detector": "defectlens.detectors",
    "load_dataset": "defectlens.data",
    "load_model": "defectlens.inference.loading",
}

__all__ = ["Bundle", "DefectLensError", "Inspection", "Inspector", "Region", "__version__", "available_detectors", "create_detector", "load_dataset",
           "load_model"]

if TYPE_CHECKING:
    from defectlens.bundle import Bundle
    from defectlens.data import load_dataset
    from defectlens.detectors import available_detectors, create_detector
    from defectlens.errors import DefectLensError
    from defectlens.inference.inspection import Inspection, Region
    from defectlens.inference.inspector import Inspector
    from defectlens.inference.loading import load_model


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'defectlens' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
