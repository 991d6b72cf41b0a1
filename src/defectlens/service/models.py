"""Model bundles a running service holds, their run-time thresholds and their versions.

Requests name models, never paths: a name is looked up as ``<name>.dlens`` in the one configured
model folder, so nothing a client sends can reach another file. A threshold changed at run time
is kept in the history store and re-applied when the same model file is loaded again, so a
restart does not silently undo a decision taken on the line. Likewise a version learned on the
line (``<name>.v<N>.dlens``) or a rollback is recorded, and loading the name again loads the
version that was running.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from defectlens.bundle import Bundle
from defectlens.errors import DefectLensError, ImageError
from defectlens.history.store import HistoryStore, utcnow
from defectlens.inference.inspection import Inspection
from defectlens.inference.inspector import Inspector
from defectlens.inference.loading import load_model
from defectlens.service.batching import Batcher, BatchSettings

log = logging.getLogger("defectlens.service")
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
    # One batch at a time per model: one pass already spreads over every core, and the threshold
    # must not change half-way through a verdict.
    lock: threading.Lock = field(default_factory=threading.Lock)
    inspections: int = 0
    batching: BatchSettings = field(default_factory=BatchSettings)

    def __post_init__(self) -> None:
        self.batcher = Batcher(self._inspect_batch, self.batching)

    def _inspect_batch(self, images: list[Image.Image]) -> list[tuple[Inspection | ImageError, str]]:
        with self.lock:
            found = list(self.inspector.inspect_many(images))
            self.inspections += len(images)
            return [(inspection, self.checksum) for inspection in found]

    def inspect(self, image: Image.Image) -> tuple[Inspection, str, float, int]:
        """Inspect one image in a batch with whatever other requests arrive with it: the inspection,
        the checksum of the model that judged it, milliseconds queued and the batch's size."""
        (inspection, checksum), waited_ms, batch = self.batcher.submit(image)
        if isinstance(inspection, ImageError):
            raise inspection
        return inspection, checksum, waited_ms, batch

    @property
    def checksum(self) -> str:
        return self.bundle.checksum

    @property
    def lineage(self) -> dict[str, Any]:
        """Where this version came from (empty for a model that was fitted, not learned)."""
        return dict(self.bundle.metadata.get("lineage") or {})

    @property
    def root_checksum(self) -> str:
        return self.lineage.get("root_checksum", self.checksum)

    @property
    def version(self) -> int:
        return int(self.lineage.get("version", 1))

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
            "version": self.version,
            "parent": self.lineage.get("parent"),
            "learns_incrementally": det.learns_incrementally,
            "runtime": self.bundle.runtime.to_dict() if self.bundle.runtime is not None else None,
        }


class ModelRegistry:
    """The models a service has loaded, by name."""

    def __init__(self, model_dir: Path, store: HistoryStore, runtime: str = "auto", batching: BatchSettings | None = None) -> None:
        self.model_dir = model_dir.resolve()
        self.store = store
        self.runtime = runtime  # what scores each model loaded (inference.load_model)
        self.batching = batching or BatchSettings()
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        # One change at a time per name: a threshold set while a new version is switched to must
        # land on the version that runs afterwards, not on the one replaced.
        self._changing: defaultdict[str, threading.RLock] = defaultdict(threading.RLock)

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
        model = self._open(path, name)
        model = self._running_version(model) or model
        with self._lock:
            self._models[name] = model
        return model

    def _open(self, path: Path, name: str) -> LoadedModel:
        model = LoadedModel(name, path, (bundle := load_model(path, self.runtime)), Inspector(bundle), batching=self.batching)
        log.info("model %s: %s", name, bundle.runtime.line())
        changes = self.store.threshold_history(name, model.checksum)
        if changes and model.calibrated_threshold is not None:
            model.apply_threshold(changes[-1]["new_threshold"])
        return model

    def _running_version(self, model: LoadedModel) -> LoadedModel | None:
        """The version this name last ran (learned on the line, or rolled back to), when its file is still there."""
        switches = self.store.versions(model.name, model.root_checksum)
        if not switches or switches[-1]["checksum"] == model.checksum:
            return None
        last = switches[-1]
        path = model.path.parent / last["file"]
        if not path.is_file():
            log.warning("model %s last ran %s, which is gone: running %s", model.name, last["file"], model.path.name)
            return None
        running = self._open(path, model.name)
        if running.checksum != last["checksum"]:
            log.warning("model %s: %s changed since it ran (checksum differs): running %s", model.name, last["file"], model.path.name)
            return None
        return running

    # -- versions ---------------------------------------------------------------------------
    def switch(self, name: str, path: Path, action: str, actor: str, feedback_ids: list[int] | None = None,
               details: dict[str, Any] | None = None, expect_checksum: str | None = None,
               audit: Callable[[LoadedModel], dict[str, Any]] | None = None) -> LoadedModel:
        """Run ``path`` under ``name`` from the next inspection on: the new model is loaded beside
        the old one and replaces it in one assignment, so no request sees half of either.
        ``audit`` makes the audit-log row from the new model; it is stored with the version, in
        one transaction, before the switch (a database lost there leaves the old model running)."""
        with self._changing[name]:
            return self._switch(name, path, action, actor, feedback_ids, details, expect_checksum, audit)

    def _switch(self, name: str, path: Path, action: str, actor: str, feedback_ids: list[int] | None, details: dict[str, Any] | None,
                expect_checksum: str | None, audit: Callable[[LoadedModel], dict[str, Any]] | None = None) -> LoadedModel:
        old = self.get(name)
        new = self._open(path, name)
        if expect_checksum and new.checksum != expect_checksum:
            raise ModelConflict(f"model '{name}': {path.name} changed since {old.path.name} was learned from it (checksum differs); not switched")
        if action == "learn" and old.threshold is not None and old.threshold != old.calibrated_threshold:
            # an operator's threshold stays in force on the version learned from its model
            new.apply_threshold(old.threshold)
            self.store.record_threshold_change(name, new.checksum, "set", new.calibrated_threshold or old.threshold, old.threshold,
                                               f"carried over from {old.path.name}", actor)
        self.store.record_version(name, action, new.version, path.name, new.checksum, new.lineage.get("parent_checksum"),
                                  new.root_checksum, feedback_ids or [], details or {}, actor, None if audit is None else audit(new))
        with self._lock:
            self._models[name] = new
        return new

    def rollback(self, name: str, actor: str, audit: Callable[[LoadedModel], dict[str, Any]] | None = None) -> LoadedModel:
        """Back to the version this one was learned from; its scores are exactly the parent's again."""
        with self._changing[name]:
            return self._rollback(name, actor, audit)

    def _rollback(self, name: str, actor: str, audit: Callable[[LoadedModel], dict[str, Any]] | None = None) -> LoadedModel:
        model = self.get(name)
        lineage = model.lineage
        if not lineage.get("parent"):
            raise ModelConflict(f"model '{name}' runs {model.path.name}, which was fitted, not learned: nothing to roll back to")
        path = model.path.parent / lineage["parent"]
        if not path.is_file():
            raise ModelConflict(f"model '{name}': its parent {lineage['parent']} is no longer beside {model.path.name}")
        return self.switch(name, path, "rollback", actor, details={"from": model.path.name, "from_checksum": model.checksum},
                           expect_checksum=lineage.get("parent_checksum"), audit=audit)

    def versions(self, name: str) -> list[dict[str, Any]]:
        model = self.get(name)
        return self.store.versions(name, model.root_checksum)

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
    # A change is stored (with its audit entry, when ``role`` is given) before it is applied: with the
    # database away the request fails and the line keeps judging at the threshold it had.
    def set_threshold(self, name: str, value: float, reason: str, actor: str, role: str | None = None) -> dict[str, Any]:
        with self._changing[name]:
            model = self.get(name)
            old = model.require_threshold()
            change = self.store.record_threshold_change(name, model.checksum, "set", old, value, reason, actor, role)
            model.apply_threshold(value)
            return change

    def undo_threshold(self, name: str, actor: str, role: str | None = None) -> dict[str, Any]:
        """Step back over the last change (an undo of an undo redoes it, like any editor)."""
        with self._changing[name]:
            model = self.get(name)
            changes = self.store.threshold_history(name, model.checksum)
            if not changes:
                raise ModelConflict(f"model '{name}' runs at its calibrated threshold: nothing to undo")
            last = changes[-1]
            change = self.store.record_threshold_change(name, model.checksum, "undo", last["new_threshold"], last["old_threshold"],
                                                        f"undo of change {last['id']}", actor, role)
            model.apply_threshold(last["old_threshold"])
            return change

    def reset_threshold(self, name: str, reason: str, actor: str, role: str | None = None) -> dict[str, Any]:
        with self._changing[name]:
            model = self.get(name)
            old = model.require_threshold()
            calibrated = model.calibrated_threshold
            assert calibrated is not None  # require_threshold refused an uncalibrated model
            change = self.store.record_threshold_change(name, model.checksum, "reset", old, calibrated, reason or "back to calibration", actor, role)
            model.apply_threshold(calibrated)
            return change
