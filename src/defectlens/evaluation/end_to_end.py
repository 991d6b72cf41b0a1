"""`defectlens benchmark DATA --end-to-end`: what `inspect --out` delivers against scoring alone.

One model, one run, the same test images for every path, so the ratios compare like with like.
The model is saved and loaded back as `inspect` loads it (``--runtime``, default ``auto``: ONNX
Runtime where its graph matches, and this machine's stored tuning), so every path, scoring
included, runs what `inspect --out` runs. The paths: the loaded detector's batched scoring; the
Inspector (verdict, mask, regions); `inspect --out` writing records only; with overlays for every
image, and for the rejected ones only (`--overlays rejected`, with the share rejected printed,
since that row's cost follows it); and with overlays and a history database. Every path reads
each image once, so the gap is the cost of what is written, not of reading files again.

Each path runs ``ROUNDS`` times, the paths taking turns, and its median rate is kept: one pass over
a category's test split takes a few seconds, and on a shared 2-core machine single passes of the
same path were seen 25 % apart, and medians of three still 10 % apart between runs.
"""

from __future__ import annotations

import statistics
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
    rounds: int = 1  # passes per path; images_per_s holds each path's median
    runtime: str = ""  # the loaded model's runtime line, as inspect prints it

    def ratios(self) -> dict[str, float]:
        base = self.images_per_s["detector scoring"]
        return {k: v / base for k, v in self.images_per_s.items()}

    def text(self) -> str:
        lines = [f"end to end on {self.dataset} ({self.images} test images, {self.detector}; median of {self.rounds} passes per path, "
                 f"the paths taking turns); machine: {self.machine}",
                 self.runtime, "| path | images/s | share of scoring |", "|---|---|---|"]
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


ROUNDS = 5


def run_end_to_end(data: str | Path, detector: str = "patchcore", params: dict | None = None, machine: str = "",
                   rounds: int = ROUNDS, runtime: str = "auto") -> EndToEnd:
    ds = load_dataset(data, validation_fraction=0.1)
    fitted = create_detector(detector, **(params or {})).fit(ds.train_good)
    paths = [s.path for s in ds.test]
    result = EndToEnd(ds.name, machine, detector, len(paths), rounds=rounds)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        inspector = Inspector.load(calibrate_detector(fitted, ds.validation).save(out / "model.dlens"), runtime=runtime)
        det = inspector.detector
        result.runtime = inspector.bundle.runtime.line()
        # warm-up: the files in the page cache, first-call allocations done
        result.rejected = sum(not isinstance(r, ImageError) and r.verdict != "good" for r in inspector.inspect_many(paths))
        runs: dict[str, Callable[[int], object]] = {  # each takes the round: every round's history is a new database
            "detector scoring": lambda r: [None for _ in det.score_batches(paths)],
            "Inspector (verdicts, regions)": lambda r: [None for _ in inspector.inspect_many(paths)],
            "inspect --out --no-overlay": lambda r: run_batch(inspector, paths, out / "records", overlays="none", fresh=True),
            "inspect --out (overlays)": lambda r: run_batch(inspector, paths, out / "overlays", overlays="all", fresh=True),
            "inspect --out --overlays rejected": lambda r: run_batch(inspector, paths, out / "rejected", overlays="rejected", fresh=True),
            "inspect --out --db (overlays, history)": lambda r: run_batch(inspector, paths, out / "db", overlays="all", fresh=True,
                                                                           db=f"sqlite:///{out / f'history{r}.db'}"),
        }
        measured: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(max(1, rounds)):
            for name, run in runs.items():
                measured[name].append(_rate(len(paths), lambda run=run, r=r: run(r)))
    result.images_per_s = {name: statistics.median(rates) for name, rates in measured.items()}
    return result
