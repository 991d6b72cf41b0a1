"""The one registry and factory of detectors: a detector is one module plus one decorator."""

from __future__ import annotations

from typing import Any

from ..errors import DefectLensError
from .base import Detector

_DETECTORS: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute 'name'")
    _DETECTORS[cls.name] = cls
    return cls


def available_detectors() -> list[str]:
    return sorted(_DETECTORS)


def detector_class(name: str) -> type[Detector]:
    try:
        return _DETECTORS[name]
    except KeyError:
        raise DefectLensError(f"unknown detector '{name}' (available: {', '.join(available_detectors())})") from None


def create_detector(name: str, **params: Any) -> Detector:
    cls = detector_class(name)
    valid = cls._get_param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise DefectLensError(f"detector '{name}' has no setting {', '.join(unknown)} (settings: {', '.join(valid)})")
    return cls(**params)
