"""`defectlens benchmark DATA --tune`: measure threads, batch size, decoding threads and search threads
on this machine, and store the best for every later load (:mod:`defectlens.inference.tuning`).

One model is fitted on the category and loaded as ``inspect`` loads it (the default runtime), then
scored through the Inspector over the same test images at every point of a grid: intra-op
threads (1, 2, 4, ... up to the usable cores), batch sizes and decoding threads. The points take
turns over ``rounds`` passes and each keeps its best pass, since on a shared machine a pass is only
ever slowed down. Where PatchCore's neighbour search runs in faiss (not inside the ONNX graph), its
thread count is measured last, at the winning point. The winner is the smallest batch, then the
fewest decoding threads, then the fewest threads within ``CLOSE`` of the best throughput: a
smaller batch answers a single request sooner and holds less memory for the same speed.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch

from defectlens.bundle import Bundle
from defectlens.data.datasets import load_dataset
from defectlens.data.images import DECODE_WORKERS
from defectlens.detectors import create_detector
from defectlens.errors import DefectLensError
from defectlens.export.runtime import feature_leaves
from defectlens.inference.inspector import Inspector
from defectlens.inference.loading import load_model
from defectlens.inference.tuning import Tuning, apply_threads
from defectlens.machine import machine_description, usable_cores

BATCHES = (1, 2, 4, 8, 16)
DECODERS = (1, 2, 4)
IMAGES = 64  # images per pass: a few seconds, enough to fill every batch size many times
ROUNDS = 2
LATENCY_IMAGES = 10
CLOSE = 0.03  # points within this share of the best throughput count as equal


def thread_counts(cores: int | None = None) -> list[int]:
    cores = cores or usable_cores()
    return sorted({1 << i for i in range(cores.bit_length()) if 1 << i <= cores} | {cores})


@dataclass
class Point:
    threads: int
    batch_size: int
    decode_workers: int
    faiss_threads: int
    images_per_s: float = 0.0  # best pass


@dataclass
class TuneResult:
    dataset: str
    machine: str
    detector: str
    runtime: str
    images: int
    points: list[Point]
    default: Point  # the untuned settings, measured in the same run
    chosen: Tuning
    latency_ms: dict[int, float] = field(default_factory=dict)  # one image, by thread count
    searched: bool = False  # whether faiss's threads were measured (PatchCore scoring in faiss)

    def text(self) -> str:
        best = sorted(self.points, key=lambda p: -p.images_per_s)[:10]
        lines = [f"tuning on {self.dataset} ({self.images} images a pass, {self.detector}, {self.runtime}); machine: {self.machine}",
                 "| threads | batch | decoding threads | search threads | images/s |", "|---|---|---|---|---|"]
        lines += [f"| {p.threads} | {p.batch_size} | {p.decode_workers} | {p.faiss_threads} | {p.images_per_s:.1f} |" for p in best]
        d, c = self.default, self.chosen
        lines.append(f"defaults ({d.threads} threads, batch {d.batch_size}, {d.decode_workers} decoding threads): {d.images_per_s:.1f} images/s; "
                     f"chosen: {c.images_per_s:.1f} images/s ({c.images_per_s / max(d.images_per_s, 1e-9):.2f}x)")
        lines.append("one image: " + ", ".join(f"{t} threads {ms:.1f} ms" for t, ms in sorted(self.latency_ms.items())))
        if not self.searched:
            lines.append("search threads not measured: this model's patch scoring runs inside its graph, not in faiss")
        lines.append(c.line())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def _rate(inspector: Inspector, paths: list) -> float:
    t0 = time.perf_counter()
    for result in inspector.inspect_many(paths):
        if isinstance(result, Exception):
            raise result
    return len(paths) / (time.perf_counter() - t0)


def _measure(inspectors: dict[int, Inspector], points: list[Point], paths: list, rounds: int) -> None:
    for _ in range(max(1, rounds)):
        for p in points:
            inspector = inspectors[p.threads]
            apply_threads(p.threads, p.faiss_threads)
            inspector.batch_size, inspector.decode_workers = p.batch_size, p.decode_workers
            p.images_per_s = max(p.images_per_s, _rate(inspector, paths))


def _latency(inspector: Inspector, paths: list) -> float:
    times = []
    for path in paths[:LATENCY_IMAGES]:
        t0 = time.perf_counter()
        inspector.inspect(path)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def _pick(points: list[Point]) -> Point:
    best = max(p.images_per_s for p in points)
    return min((p for p in points if p.images_per_s >= (1 - CLOSE) * best), key=lambda p: (p.batch_size, p.decode_workers, p.threads))


def run_tune(data: str | Path, detector: str = "patchcore", params: dict | None = None, images: int | None = None,
             rounds: int | None = None, threads: list[int] | None = None, batches: tuple[int, ...] | None = None,
             decoders: tuple[int, ...] | None = None) -> TuneResult:
    """The grid (threads: 1, 2, 4, ... up to the usable cores; ``BATCHES``; ``DECODERS``) measured on
    ``images`` images a pass (``IMAGES``) over ``rounds`` passes (``ROUNDS``)."""
    images, rounds = images or IMAGES, rounds or ROUNDS
    threads, batches, decoders = threads or thread_counts(), batches or BATCHES, decoders or DECODERS
    if not (batches and decoders and threads):
        raise DefectLensError("nothing to tune: the grid of threads, batch sizes and decoding threads is empty")
    ds = load_dataset(data, validation_fraction=0.0)
    det = create_detector(detector, **(params or {})).fit(ds.train_good)
    pool = [s.path for s in ds.test] or list(ds.train_good)
    paths = [pool[i % len(pool)] for i in range(max(images, 1))]
    untuned = torch.get_num_threads()
    default = Point(untuned, det.batch_size, DECODE_WORKERS, untuned)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = Bundle(det).save(Path(tmp) / "model.dlens")
            # one loaded copy per thread count: ONNX Runtime fixes a session's threads when it is made
            inspectors = {t: Inspector(load_model(model, "auto", Tuning(t, 1, 1, t))) for t in sorted({*threads, untuned})}
            bundle = inspectors[untuned].bundle
            for inspector in inspectors.values():
                _rate(inspector, paths[:8])  # warm-up: first-call allocations are not throughput
            grid = [Point(t, b, w, t) for t in threads for b in batches for w in decoders]
            _measure(inspectors, [*grid, default], paths, rounds)
            win = _pick(grid)
            searched = any(leaf.name == "patchcore" for leaf in feature_leaves(bundle.detector)) and "whole" not in bundle.runtime.kinds
            if searched:
                others = [Point(win.threads, win.batch_size, win.decode_workers, f) for f in threads if f != win.faiss_threads]
                _measure(inspectors, others, paths, rounds)
                grid += others
                win = _pick([win, *others])
            latency = {}
            for t, inspector in inspectors.items():
                apply_threads(t, t)
                latency[t] = _latency(inspector, paths)
    finally:
        apply_threads(untuned, untuned)
    chosen = Tuning(win.threads, win.batch_size, win.decode_workers, win.faiss_threads,
                    measured=f"{date.today().isoformat()}, {detector} on {ds.name}", images_per_s=round(win.images_per_s, 2),
                    default_images_per_s=round(default.images_per_s, 2))
    runtime = bundle.runtime.line().removeprefix("runtime: ").split(";")[0]
    return TuneResult(ds.name, machine_description(), detector, runtime, len(paths), grid, default, chosen, latency, searched)
