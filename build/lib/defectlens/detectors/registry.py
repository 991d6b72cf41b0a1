"""The one registry and factory of detectors: a detector is one module plus one decorator."""

from __future__ import annotations

from typing import Any

from defectlens.detectors.base import Detector
from defectlens.errors import DefectLensError

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


def create_from_spec(spec: str, params: dict[str, Any]) -> Detector:
    """A detector from ``name`` or ``wrapper:inner`` (``tiled:padim``, ``ensemble:padim``).

    One set of options serves every detector of a comparison, so each part takes only the options
    it has; a wrapper's own settings (an ensemble's image size, a tiling's map size) win over the
    inner detector's, and the wrapper overrides what it must (the tile size, each member's backbone).
    """
    outer, _, inner = spec.partition(":")
    outer_keys = detector_class(outer)._get_param_names()
    own = {k: v for k, v in params.items() if k in outer_keys}
    if not inner:
        return create_detector(outer, **own)
    if "detector_params" not in outer_keys:
        raise DefectLensError(f"detector '{outer}' wraps no other detector, so '{spec}' is not a detector")
    inner_keys = detector_class(inner)._get_param_names()
    wrapped = {k: v for k, v in params.items() if k in inner_keys and k not in own}
    return create_detector(outer, **{**own, "detector": inner, "detector_params": wrapped})
