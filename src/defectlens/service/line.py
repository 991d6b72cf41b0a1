"""The line loop of a running service: operator feedback, learning from it, rollback, drift watch.

Feedback is a history row of its own and never touches the verdict it is about. A part confirmed
good teaches the model at once when its detector can learn incrementally and the service kept a
copy of the image (``serve --keep-images``): the new version is written beside the old file and
switched to for the next inspection. Otherwise the feedback is queued for the next ``fit`` and
says why. Confirmed defects are recorded for labelled calibration.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from defectlens.calibration.drift import DriftMonitor, DriftSettings, expected_frr_of
from defectlens.errors import DefectLensError
from defectlens.history.store import HistoryStore, StoreError, audit_row
from defectlens.service.metrics import ServiceMetrics
from defectlens.service.models import LoadedModel, ModelNotFound, ModelRegistry
from defectlens.service.security import Caller
from defectlens.workflows.learning import learn_good

log = logging.getLogger("defectlens.service")
LABELS = ("good", "defect")
SERIES = 200  # recent scores the dashboard's drift chart shows


class LineLoop:
    def __init__(self, store: HistoryStore, registry: ModelRegistry, metrics: ServiceMetrics, drift: DriftSettings,
                 saved_image: Callable[[int], Path], learn: bool = True) -> None:
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.drift_settings = drift
        self._saved_image = saved_image
        self.learn = learn
        self._monitors: dict[str, tuple[str, DriftMonitor | None]] = {}
        self._monitor_lock = threading.Lock()
        self._learning: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)  # one new version at a time per model

    # -- drift --------------------------------------------------------------------------------
    def monitor(self, model: LoadedModel) -> DriftMonitor | None:
        """This model version's drift monitor, started from its recent history (a restart keeps the window)."""
        return self._monitor(model)[0]

    def _monitor(self, model: LoadedModel) -> tuple[DriftMonitor | None, bool]:
        """(monitor, whether it was started now from the history)."""
        with self._monitor_lock:
            checksum, mon = self._monitors.get(model.name, ("", None))
            if checksum == model.checksum:
                if mon is not None and model.threshold is not None:
                    mon.threshold = model.threshold  # rejects count at the threshold in force, an operator's included
                return mon, False
        cal = model.inspector.calibration
        mon = None
        if cal is not None and cal.good_scores:
            mon = DriftMonitor(cal.good_scores, cal.image_threshold, expected_frr_of(cal), self.drift_settings)
            try:  # outside the lock: a slow or absent database holds up no inspection
                mon.extend(self.store.recent_scores(model.name, model.checksum, self.drift_settings.window)[::-1])
            except StoreError as exc:
                log.warning("drift watch of %s starts empty: %s", model.name, exc)
        with self._monitor_lock:
            checksum, other = self._monitors.get(model.name, ("", None))
            if checksum == model.checksum:  # another thread started it meanwhile: one window only
                return other, False
            self._monitors[model.name] = (model.checksum, mon)
            return mon, True

    def observe(self, model: LoadedModel, score: float) -> None:
        """Called after the inspection's row is stored: a monitor started now has it from the history already."""
        if all(m is not model for m in self.registry.loaded()):
            return  # the name switched to another version while this image was inspected: its window starts afresh
        mon, started = self._monitor(model)
        if mon is not None:
            if not started:
                mon.add(score)
            report = mon.report()
            self.metrics.drift(model.name, report.state, report.ks_statistic)

    def drift(self, name: str) -> dict[str, Any]:
        model = self.registry.get(name)
        mon = self.monitor(model)
        series = self.store.recent_scores(model.name, None, SERIES, with_rows=True)[::-1]
        base = {"model": name, "checksum": model.checksum, "threshold": model.threshold, "settings": vars(self.drift_settings).copy(),
                "series": series}
        if mon is None:
            return {**base, "state": "ok", "reasons": ["the model has no calibration to compare with"], "n": 0}
        report = mon.report()
        self.metrics.drift(name, report.state, report.ks_statistic)
        return {**base, **report.to_dict()}

    def drift_state(self, model: LoadedModel) -> str:
        mon = self.monitor(model)
        return "ok" if mon is None else mon.report().state

    # -- feedback -----------------------------------------------------------------------------
    def feedback(self, inspection_id: int, label: str, note: str, caller: Caller, defect_type: str | None = None) -> dict[str, Any]:
        if label not in LABELS:
            raise DefectLensError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        row = self.store.get(inspection_id)
        if row is None:
            raise ModelNotFound(f"inspection {inspection_id}: not in the history")
        name = row["model"]
        status = "recorded" if label == "defect" else "queued"
        if label == "good" and defect_type:
            raise DefectLensError("a defect type goes with label 'defect' only")
        fb = self.store.record_feedback(inspection_id, name, label, note, caller.actor, status,
                                        "kept for 'calibrate --from-history' (labelled rules, defect typing)" if label == "defect" else None,
                                        defect_type=defect_type, role=caller.role)
        self.metrics.feedback.labels(name, label).inc()
        learning = self._learn(fb, caller) if label == "good" else None
        if learning is not None:  # its status changed: read this feedback back (not another operator's newer one)
            fb = next(f for f in self.store.feedback(inspection_id=inspection_id) if f["id"] == fb["id"])
        return {"feedback": fb, "learning": learning}

    def _learn(self, fb: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """Teach the model the confirmed-good image now, or queue it (with the reason) for the next fit."""
        name = fb["model"]
        if not self.learn:
            return self._queue(fb, "this service runs with --no-learn: confirmed parts are kept for the next fit or 'defectlens learn'")
        try:
            image = self._saved_image(fb["inspection_id"])
        except ModelNotFound as exc:
            return self._queue(fb, f"{exc}: start serve with --keep-images so confirmed parts can teach the model")
        with self._learning[name]:
            try:
                model = self.registry.get(name)
            except ModelNotFound:
                return self._queue(fb, f"model '{name}' is not loaded")
            if not model.bundle.detector.learns_incrementally:
                return self._queue(fb, f"{model.bundle.detector.name} cannot learn without a refit: queued for the next fit")
            try:
                child, report = learn_good(model.bundle, [str(image)], model.path, [fb["id"]])
            except DefectLensError as exc:
                return self._queue(fb, str(exc))
            details = report.to_dict()
            entry = audit_row(caller.actor, caller.role, "model.learn", name,
                              {"file": report.path.name, "version": report.version, "feedback_ids": [fb["id"]]})
            new = self.registry.switch(name, report.path, "learn", caller.actor, [fb["id"]], details, audit=lambda _new: entry)
        self.store.update_feedback(fb["id"], "learned", None, new.checksum)  # the version row names the feedback ids too
        self.metrics.versions.labels(name, "learn").inc()
        log.info("model %s learned feedback %s: now %s", name, fb["id"], report.path.name)
        return {"status": "learned", **details, "model": new.describe()}

    def _queue(self, fb: dict[str, Any], reason: str) -> dict[str, Any]:
        self.store.update_feedback(fb["id"], "queued", reason)
        return {"status": "queued", "reason": reason}

    def rollback(self, name: str, caller: Caller) -> dict[str, Any]:
        with self._learning[name]:
            before = self.registry.get(name)
            model = self.registry.rollback(name, caller.actor, audit=lambda parent: audit_row(
                caller.actor, caller.role, "model.rollback", name, {"from": before.path.name, "to": parent.path.name}))
        self.metrics.versions.labels(name, "rollback").inc()
        return model.describe()


__all__ = ["LABELS", "LineLoop"]
