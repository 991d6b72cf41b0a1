"""`defectlens benchmark DATA --line-loop`: a moved line, operator feedback, learning, rollback, drift.

The line moves (the lamp brightens, contrast drops, the fixture shifts the part a little) and good
parts start failing. Through the service's own API, an operator confirms five of those false
rejects as good; the model learns them as a new version. Measured before and after, on the other
moved good parts (false-reject rate) and on the defective test parts, moved and not (recall):
what the feedback bought and what it cost. Then a rollback must give the old scores exactly.

The drift watch is run over the same scores as the service would see them: the unmoved good test
parts cycled to ``DRIFT_STREAM`` inspections (it must never say ``drift``), and a stream that
moves after ``DRIFT_LEAD`` unmoved parts (how many inspections until it says ``drift``).
"""

from __future__ import annotations

import io
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from defectlens.bundle import Bundle
from defectlens.calibration.drift import DriftMonitor, DriftSettings, expected_frr_of
from defectlens.data.datasets import load_dataset
from defectlens.data.images import load_rgb
from defectlens.detectors import create_detector
from defectlens.inference.inspector import Inspector
from defectlens.workflows.fitting import fit_dataset

FEEDBACK = 5  # false rejects the operator confirms as good
DRIFT_STREAM = 500
DRIFT_LEAD = 100
OPERATOR_KEY = "operator:line-loop-benchmark"


@dataclass(frozen=True)
class LineMove:
    """A good part photographed after the line moved."""

    gain: float = 1.25  # brighter lamp
    contrast: float = 0.85  # flatter light
    shift: float = 0.02  # the fixture moved by this share of the image

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        moved = ndimage.shift(rgb, (self.shift * h, -self.shift * w, 0), order=1, mode="nearest")
        return np.clip(((moved - 0.5) * self.contrast + 0.5) * self.gain, 0, 1).astype(np.float32)

    def describe(self) -> str:
        return f"brightness x{self.gain:g}, contrast x{self.contrast:g}, shifted {100 * self.shift:g} % of the image"


@dataclass
class LineLoopResult:
    dataset: str
    detector: str
    move: str
    n_moved_good: int
    n_defects: int
    taught: int
    frr_before: float  # on the moved good parts not taught
    frr_after: float
    recall_before: float  # on the defective test parts as photographed
    recall_after: float
    moved_recall_before: float  # on the defective test parts, moved like the good ones
    moved_recall_after: float
    learn_s: float  # per feedback, through the API (learning, re-check, saving, switching)
    recheck: dict | None
    rollback_exact: bool
    drift_false_alarms: int  # inspections called drift in the unmoved stream
    drift_warnings: int
    drift_flagged_after: int | None  # moved inspections until drift (None: never within the stream)
    notes: list[str] = field(default_factory=list)
    scores: dict = field(default_factory=dict)  # what the drift figures came from, so another rule can be replayed on them


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _scores(bundle: Bundle, images: list) -> np.ndarray:
    return np.array([i.score for i in Inspector(bundle).inspect_many(images)], dtype=np.float64)


def run_line_loop(data: str | Path, detector: str = "patchcore", params: dict | None = None, move: LineMove | None = None,
                  seed: int = 0) -> LineLoopResult:
    from fastapi.testclient import TestClient

    from defectlens.service.app import InspectionService, ServiceSettings, create_app

    move = move or LineMove()
    ds = load_dataset(data)
    bundle = fit_dataset(create_detector(detector, **(params or {})), ds)
    cal = bundle.calibration
    assert cal is not None
    goods = [s.path for s in ds.test if not s.label]
    defects = [s.path for s in ds.test if s.label]
    moved_goods = [move.apply(load_rgb(p)) for p in goods]
    moved_defects = [move.apply(load_rgb(p)) for p in defects]
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "models"
        folder.mkdir()
        path = bundle.save(folder / f"{ds.name}.dlens")
        settings = ServiceSettings(db_url=f"sqlite:///{Path(tmp) / 'history.db'}", model_dir=folder, models=[path],
                                   api_keys=[OPERATOR_KEY, "admin-line-loop"], image_dir=Path(tmp) / "images")
        client = TestClient(create_app(InspectionService(settings)))
        key = {"X-API-Key": OPERATOR_KEY.split(":", 1)[1]}
        rows = []
        for i, rgb in enumerate(moved_goods):
            answer = client.post(f"/api/models/{ds.name}/inspect", files={"file": (f"moved{i}.png", _png(rgb), "image/png")})
            answer.raise_for_status()
            rows.append(answer.json())
        rejected = [i for i, r in enumerate(rows) if r["verdict"] == "defect"]
        order = np.random.default_rng(seed).permutation(len(rejected))
        taught = sorted(rejected[j] for j in order[:FEEDBACK])
        if len(taught) < FEEDBACK:
            notes.append(f"only {len(taught)} moved good parts were rejected: the move is too small for this model to need feedback")
        t0 = time.perf_counter()
        recheck = None
        for i in taught:
            answer = client.post(f"/api/history/{rows[i]['id']}/feedback", json={"label": "good", "note": "the line moved"}, headers=key)
            answer.raise_for_status()
            learning = answer.json()["learning"]
            if learning["status"] != "learned":
                notes.append(f"feedback not learned: {learning.get('reason')}")
            recheck = learning.get("recheck", recheck)
        learn_s = (time.perf_counter() - t0) / max(1, len(taught))
        running = client.get(f"/api/models/{ds.name}").json()
        learned = Bundle.load(folder / running["file"])
        others = [i for i in range(len(goods)) if i not in set(taught)]
        thr = cal.image_threshold
        before = {"good": _scores(bundle, [moved_goods[i] for i in others]), "defect": _scores(bundle, defects),
                  "moved": _scores(bundle, moved_defects)}
        after = {"good": _scores(learned, [moved_goods[i] for i in others]), "defect": _scores(learned, defects),
                 "moved": _scores(learned, moved_defects)}
        probe = moved_goods[:10]
        for _ in taught:
            client.post(f"/api/models/{ds.name}/rollback", headers={"X-API-Key": "admin-line-loop"}).raise_for_status()
        rolled = client.get(f"/api/models/{ds.name}").json()
        exact = rolled["checksum"] == bundle.checksum and bool(np.array_equal(_scores(Bundle.load(folder / rolled["file"]), probe),
                                                                              _scores(bundle, probe)))
        client.close()

    drift = DriftSettings()
    plain = _scores(bundle, goods)
    monitor = DriftMonitor(cal.good_scores, thr, expected_frr_of(cal), drift)
    states = []
    for k in range(DRIFT_STREAM):
        monitor.add(float(plain[k % len(plain)]))
        states.append(monitor.report().state)
    shifted = _scores(bundle, moved_goods)
    monitor = DriftMonitor(cal.good_scores, thr, expected_frr_of(cal), drift)
    monitor.extend([float(plain[k % len(plain)]) for k in range(DRIFT_LEAD)])
    flagged = None
    for k in range(DRIFT_STREAM - DRIFT_LEAD):
        monitor.add(float(shifted[k % len(shifted)]))
        if monitor.report().state == "drift":
            flagged = k + 1
            break

    def rate(v: np.ndarray) -> float:
        return float(cal.rejects(v).mean()) if len(v) else float("nan")

    return LineLoopResult(
        ds.name, detector, move.describe(), len(goods), len(defects), len(taught),
        rate(before["good"]), rate(after["good"]), rate(before["defect"]), rate(after["defect"]),
        rate(before["moved"]), rate(after["moved"]), learn_s, recheck, exact,
        states.count("drift"), states.count("warning"), flagged, notes,
        {"reference": list(cal.good_scores), "threshold": thr, "expected_frr": expected_frr_of(cal), "plain": plain.tolist(), "moved": shifted.tolist()})


HEADER = ("| data set | detector | good / defects | taught | FRR moved good: before → after | recall: before → after | "
          "recall moved defects: before → after | s per feedback | rollback exact | drift: false alarms in 500 | moved flagged after |")


def row(r: LineLoopResult) -> str:
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    return (f"| {r.dataset} | {r.detector} | {r.n_moved_good} / {r.n_defects} | {r.taught} | {pct(r.frr_before)} → {pct(r.frr_after)} | "
            f"{pct(r.recall_before)} → {pct(r.recall_after)} | {pct(r.moved_recall_before)} → {pct(r.moved_recall_after)} | "
            f"{r.learn_s:.1f} | {'yes' if r.rollback_exact else 'NO'} | {r.drift_false_alarms} ({r.drift_warnings} warnings) | "
            f"{'never' if r.drift_flagged_after is None else r.drift_flagged_after} |")


def markdown(results: list[LineLoopResult], machine: str) -> str:
    lines = [f"line loop (`defectlens benchmark DATA --line-loop`); machine: {machine}", "", HEADER, "|" + "---|" * 11]
    lines += [row(r) for r in results]
    for r in results:
        lines += [f"- {r.dataset}: {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


def as_dicts(results: list[LineLoopResult]) -> list[dict]:
    return [asdict(r) for r in results]

