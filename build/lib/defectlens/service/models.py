"""Model bundles a running service holds, and their run-time thresholds.

Requests name models, never paths: a name is looked up as ``<name>.dlens`` in the one configured
model folder, so nothing a client sends can reach another file. A threshold changed at run time
is kept in the history store and re-applied when the same model file is loaded again, so a
restart does not silently undo a decision taken on the line.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from defectlens.bundle import Bundle
from defectlens.errors import DefectLensError
from defectlens.history.store import HistoryStore, utcnow
from defectlens.inference.inspector import Inspector
from defectlens.inference.loading import load_model

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SUFFIX = ".dlens"


class ModelNotFound(DefectLensError):
    """No such model loaded or in the model folder (HTTP 404)."""


class ModelConflict(DefectLensError):
    """The request does not fit the model's state, e.g. a threshold for an uncalibrated model (HTTP 409)."""


@dataclass
class LoadedModel:
    name: str
    path: Path
    bundle: Bundle
    inspector: Inspector
    loaded_at: datetime = field(default_factory=utcnow)
    # One inspection at a time per model: torch already spreads one batch over every core, and
    # the threshold must not change half-way through a verdict.
    lock: threading.Lock = field(default_factory=threading.Lock)
    inspections: int = 0

    @property
    def checksum(self) -> str:
        return self.bundle.checksum

    @property
    def calibrated_threshold(self) -> float | None:
        cal = self.bundle.calibration
        return None if cal is None else cal.image_threshold

    @property
    def threshold(self) -> float | None:
        cal = self.inspector.calibration
        return None if cal is None else cal.image_threshold

    def require_threshold(self) -> float:
        """The threshold in force; a model without a calibration has none to change."""
        if self.bundle.calibration is None or self.inspector.calibration is None:
            raise ModelConflict(f"model '{self.name}' has no calibrated threshold to change; run 'defectlens calibrate' on it first")
        return self.inspector.calibration.image_threshold

    def apply_threshold(self, value: float) -> None:
        self.require_threshold()
        assert self.bundle.calibration is not None
        with self.lock:
            self.inspector.calibration = replace(self.bundle.calibration, image_threshold=float(value))

    def describe(self) -> dict[str, Any]:
        det = self.bundle.detector
        cal = self.bundle.calibration
        return {
            "name": self.name,
            "file": self.path.name,
            "checksum": self.checksum,
            "detector": det.name,
            "params": det.get_params(),
            "loaded_at": self.loaded_at.isoformat(),
            "threshold": self.threshold,
            "calibrated_threshold": self.calibrated_threshold,
            "pixel_threshold": None if cal is None else cal.pixel_threshold,
            "strategy": None if cal is None else cal.strategy,
            "inspections": self.inspections,
        }


class ModelRegistry:
    """The models a service has loaded, by name."""

    def __init__(self, model_dir: Path, store: HistoryStore) -> None:
        self.model_dir = model_dir.resolve()
        self.store = store
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def path_for(self, name: str) -> Path:
        """``<model_dir>/<name>.dlens``; a name that could leave the folder is refused."""
        if not NAME.match(name):
            raise ModelNotFound(f"'{name}': model names are letters, digits, '.', '_' and '-' (no paths)")
        path = (self.model_dir / f"{name}{SUFFIX}").resolve()
        if path.parent != self.model_dir or not path.is_file():
            raise ModelNotFound(f"'{name}': no model file {name}{SUFFIX} in the model folder")
        return path

    def available(self) -> list[str]:
        if not self.model_dir.is_dir():
            return []
        return sorted(p.stem for p in self.model_dir.glob(f"*{SUFFIX}") if p.is_file() and NAME.match(p.stem))

    def load(self, name: str) -> LoadedModel:
        return self.load_file(self.path_for(name), name)

    def load_file(self, path: Path, name: str | None = None) -> LoadedModel:
        """Load a bundle (the operator's command line may name any file; requests only names)."""
        name = name or path.stem
        if not NAME.match(name):
            raise DefectLensError(f"{path}: model name '{name}' must be letters, digits, '.', '_' and '-'")
        model = LoadedModel(name, path, (bundle := load_model(path)), Inspector(bundle))
        changes = self.store.threshold_history(name, model.checksum)
        if changes and model.calibrated_threshold is not None:
            model.apply_threshold(changes[-1]["new_threshold"])
        with self._lock:
            self._models[name] = model
        return model

    def unload(self, name: str) -> None:
        with self._lock:
            if self._models.pop(name, None) is None:
                raise ModelNotFound(f"'{name}': no such model loaded")

    def get(self, name: str) -> LoadedModel:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(f"'{name}': no such model loaded (loaded: {', '.join(self._models) or 'none'})") from None

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    # -- thresholds -------------------------------------------------------------------------
    def set_threshold(self, name: str, value: float, reason: str, actor: str) -> dict[str, Any]:
        model = self.get(name)
        old = model.require_threshold()
        model.apply_threshold(value)
        return self.store.record_threshold_change(name, model.checksum, "set", old, value, reason, actor)

    def undo_threshold(self, name: str, actor: str) -> dict[str, Any]:
        """Step back over the last change (an undo of an undo redoes it, like any editor)."""
        model = self.get(name)
        changes = self.store.threshold_history(name, model.checksum)
        if not changes:
            raise ModelConflict(f"model '{name}' runs at its calibrated threshold: nothing to undo")
        last = changes[-1]
        model.apply_threshold(last["old_threshold"])
        return self.store.record_threshold_change(name, model.checksum, "undo", last["new_threshold"], last["old_threshold"],
                                                  f"undo of change {last['id']}", actor)

    def reset_threshold(self, name: str, reason: str, actor: str) -> dict[str, Any]:
        model = self.get(name)
        old = model.require_threshold()
        calibrated = model.calibrated_threshold
        assert calibrated is not None  # require_threshold refused an uncalibrated model
        model.apply_threshold(calibrated)
        return self.store.record_threshold_change(name, model.checksum, "reset", old, calibrated, reason or "back to calibration", actor)
