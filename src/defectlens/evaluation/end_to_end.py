"""`defectlens benchmark DATA --end-to-end`: what `inspect --out` delivers against scoring alone.

One model, one run, the same test images for every path, so the ratios compare like with like:
the detector's batched scoring; the Inspector (verdict, mask, regions); `inspect --out` writing
records only; with overlays for every image, and for the rejected ones only (`--overlays
rejected`, with the share rejected printed, since that row's cost follows it); and with overlays
and a history database. Every path reads each
image once, so the gap is the cost of what is written, not of reading files again.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from defectlens.batch.outputs import run_batch
from defectlens.data.datasets import load_dataset
from defectlens.detectors import create_detector
from defectlens.errors import ImageError
from defectlens.inference.inspector import Inspector
from defectlens.workflows.fitting import calibrate_detector


@dataclass
class EndToEnd:
    dataset: str
    machine: str
    detector: str
    images: int
    images_per_s: dict[str, float] = field(default_factory=dict)
    rejected: int = 0  # test images not judged good: the overlays `--overlays rejected` draws

    def ratios(self) -> dict[str, float]:
        base = self.images_per_s["detector scoring"]
        return {k: v / base for k, v in self.images_per_s.items()}

    def text(self) -> str:
        lines = [f"end to end on {self.dataset} ({self.images} test images, {self.detector}); machine: {self.machine}",
                 "| path | images/s | share of scoring |", "|---|---|---|"]
        lines += [f"| {k} | {v:.1f} | {100 * self.ratios()[k]:.0f} % |" for k, v in self.images_per_s.items()]
        lines.append(f"--overlays rejected drew {self.rejected} of {self.images} overlays ({100 * self.rejected / max(self.images, 1):.0f} % "
                     "of these test images were rejected; a line rejects far fewer)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "ratios": self.ratios()}


def _rate(n: int, run: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    run()
    return n / (time.perf_counter() - t0)


def run_end_to_end(data: str | Path, detector: str = "patchcore", params: dict | None = None, machine: str = "") -> EndToEnd:
    ds = load_dataset(data, validation_fraction=0.1)
    det = create_detector(detector, **(params or {})).fit(ds.train_good)
    inspector = Inspector(calibrate_detector(det, ds.validation))
    paths = [s.path for s in ds.test]
    result = EndToEnd(ds.name, machine, detector, len(paths))
    # warm-up: the files in the page cache, first-call allocations done
    result.rejected = sum(not isinstance(r, ImageError) and r.verdict != "good" for r in inspector.inspect_many(paths))
    rates = result.images_per_s
    rates["detector scoring"] = _rate(len(paths), lambda: [None for _ in det.score_batches(paths)])
    rates["Inspector (verdicts, regions)"] = _rate(len(paths), lambda: [None for _ in inspector.inspect_many(paths)])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rates["inspect --out --no-overlay"] = _rate(len(paths), lambda: run_batch(inspector, paths, out / "records", overlays="none", fresh=True))
        rates["inspect --out (overlays)"] = _rate(len(paths), lambda: run_batch(inspector, paths, out / "overlays", overlays="all", fresh=True))
        rates["inspect --out --overlays rejected"] = _rate(
            len(paths), lambda: run_batch(inspector, paths, out / "rejected", overlays="rejected", fresh=True))
        rates["inspect --out --db (overlays, history)"] = _rate(
            len(paths), lambda: run_batch(inspector, paths, out / "db", overlays="all", fresh=True, db=f"sqlite:///{out / 'history.db'}"))
    return result
