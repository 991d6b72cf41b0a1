"""Speed and memory figures of fit and inspect on one data set, printed by `defectlens benchmark`.

Performance targets live here, not in timed tests: figures depend on the machine, so they are
measured and reported with the machine's description.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from defectlens.bundle import library_versions
from defectlens.data.datasets import load_dataset
from defectlens.data.images import DECODE_WORKERS, ModelSize, format_size
from defectlens.detectors import Detector, create_detector
from defectlens.evaluation.evaluate import load_mask
from defectlens.machine import machine_description
from defectlens.metrics import image_auroc, pixel_auroc

ROUNDS = 3  # passes over the test images per scorer; the median is reported


@dataclass
class BenchmarkResult:
    dataset: str
    machine: str
    detector: str
    backbone: str
    image_size: ModelSize
    train_images: int
    test_images: int
    state_mib: float  # learned state without the backbone: memory bank, Gaussians, ...
    fit_s: float
    inspect_images_per_s: float
    latency_ms_median: float
    stage_ms: dict[str, float]
    peak_rss_mib: float
    image_auroc: float
    pixel_auroc: float
    runtime: dict | None = None  # the default runtime (--runtime auto, as inspect and serve load a model) on the same images
    onnx: dict | None = None  # the exported whole-model graph in ONNX Runtime: speed, largest score and map differences
    settings: dict | None = None  # the detector's settings that differ from its defaults

    def text(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in self.stage_ms.items())
        return "\n".join([
            f"benchmark: {self.detector} / {self.backbone} @ {format_size(self.image_size)}px on '{self.dataset}'",
            f"  machine:               {self.machine}",
            *([f"  settings:              {', '.join(f'{k}={v}' for k, v in self.settings.items())}"] if self.settings else []),
            f"  fit:                   {self.fit_s:.1f} s for {self.train_images} images (learned state {self.state_mib:.1f} MiB)",
            f"  inspect (batched):     {self.inspect_images_per_s:.1f} images/s over {self.test_images} images (PyTorch)",
            f"  inspect (one image):   {self.latency_ms_median:.1f} ms median latency (PyTorch)",
            f"  stages (ms/image):     {stages}",
            f"  peak memory (RSS):     {self.peak_rss_mib:.0f} MiB",
            f"  image AUROC:           {self.image_auroc:.4f}",
            f"  pixel AUROC:           {self.pixel_auroc:.4f}",
            *([_line("default runtime", self.runtime, self.inspect_images_per_s, self.latency_ms_median)] if self.runtime else []),
            *([_line("exported ONNX graph", self.onnx, self.inspect_images_per_s, self.latency_ms_median)] if self.onnx else []),
        ])


def _line(label: str, figures: dict, torch_images_per_s: float, torch_latency_ms: float) -> str:
    """One runtime beside the PyTorch path measured in the same run: speed, ratio and agreement."""
    name = f"{label}:".ljust(22)
    where = "".join(f"; {part}" for part in figures["runtime"].split("; ") if not part.startswith("largest")) if "runtime" in figures else ""
    return (f"  {name} {figures['images_per_s']:.1f} images/s batched ({figures['images_per_s'] / torch_images_per_s:.2f}x PyTorch), "
            f"{figures['latency_ms_median']:.1f} ms one image ({figures['latency_ms_median'] / torch_latency_ms:.2f}x){where}; "
            f"largest difference from PyTorch: score {figures['max_score_diff']:.1e}, map {figures['max_map_diff']:.1e}")


def run_benchmark(data: str, detector: str = "patchcore", latency_images: int = 20, onnx: bool = True, rounds: int = ROUNDS,
                  **params) -> BenchmarkResult:
    ds = load_dataset(data, validation_fraction=0.0)
    det = create_detector(detector, **params)
    t0 = time.perf_counter()
    det.fit(ds.train_good)
    fit_s = time.perf_counter() - t0

    paths = [s.path for s in ds.test] or ds.train_good
    with tempfile.TemporaryDirectory() as tmp:
        scorers, runtime_name = _scorers(det, Path(tmp)) if onnx else ({"torch": _Scorer(det)}, "")
        runs = _measure_interleaved(scorers, paths, latency_images, rounds)
    run = runs["torch"]
    labels = np.array([s.label for s in ds.test])
    img_auc = pix_auc = float("nan")
    if ds.test:
        img_auc = image_auroc(labels, run.scores)
        masks = np.stack([load_mask(s.mask_path, det.image_size) for s in ds.test])
        pix_auc = pixel_auroc(masks, run.maps)
    return BenchmarkResult(
        dataset=ds.name,
        machine=machine_description(),
        detector=detector,
        backbone=det.get_params().get("backbone", ""),
        image_size=det.image_size,
        train_images=len(ds.train_good),
        test_images=len(paths),
        state_mib=learned_state_mib(det),
        fit_s=fit_s,
        inspect_images_per_s=run.images_per_s,
        latency_ms_median=run.latency_ms,
        stage_ms=run.stage_ms,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        image_auroc=img_auc,
        pixel_auroc=pix_auc,
        runtime={**_agreement(runs["runtime"], run), "runtime": runtime_name} if "runtime" in runs else None,
        onnx=_agreement(runs["export"], run) if "export" in runs else None,
        settings=_changed_settings(det),
    )


def learned_state_mib(det: Detector) -> float:
    """Size of what fitting learned (memory bank, Gaussians...), without the backbone's weights."""
    return sum(v.nbytes for k, v in det.get_state().items() if not k.startswith("backbone.")) / 2**20


def _changed_settings(det: Detector) -> dict:
    defaults = type(det)().get_params()
    return {k: v for k, v in det.get_params().items() if k != "verbose" and v != defaults[k]}


@dataclass
class _Run:
    scores: np.ndarray
    maps: np.ndarray
    images_per_s: float
    latency_ms: float
    stage_ms: dict[str, float]


@dataclass
class _Scorer:
    """A detector and the batch and decoding threads it is run with (a stored tuning's, for the
    default runtime, as ``inspect`` runs it)."""

    detector: Detector
    batch_size: int | None = None
    workers: int = DECODE_WORKERS


def _measure_interleaved(scorers: dict[str, _Scorer], paths: list, latency_images: int, rounds: int) -> dict[str, _Run]:
    """Each scorer's median throughput over ``rounds`` passes, taken in turn, so a machine that
    slows down or speeds up during the run (shared cores, heat) favours none of them."""
    passes: dict[str, list[_Run]] = {name: [] for name in scorers}
    for scorer in scorers.values():
        scorer.detector.score(paths[: scorer.detector.batch_size])  # warm-up: first-call allocations are not throughput
    for _ in range(max(1, rounds)):
        for name, scorer in scorers.items():
            passes[name].append(_measure(scorer, paths, latency_images))
    return {name: _median_run(runs) for name, runs in passes.items()}


def _median_run(runs: list[_Run]) -> _Run:
    middle = sorted(runs, key=lambda r: r.images_per_s)[len(runs) // 2]
    return _Run(runs[0].scores, runs[0].maps, middle.images_per_s, statistics.median(r.latency_ms for r in runs), middle.stage_ms)


def _measure(scorer: _Scorer, paths: list, latency_images: int) -> _Run:
    """Batched throughput with per-stage times, then single-image latency, of one scorer."""
    scores, maps, stage_totals = [], [], {}
    t0 = time.perf_counter()
    for out in scorer.detector.score_batches(paths, batch_size=scorer.batch_size, workers=scorer.workers):
        scores.append(out.scores)
        maps.append(out.maps)
        for k, v in out.timings_ms.items():
            stage_totals[k] = stage_totals.get(k, 0.0) + v
    throughput = len(paths) / (time.perf_counter() - t0)
    latencies = []
    for p in paths[:latency_images]:
        t1 = time.perf_counter()
        scorer.detector.score([p])
        latencies.append((time.perf_counter() - t1) * 1000.0)
    return _Run(np.concatenate(scores), np.concatenate(maps), throughput, statistics.median(latencies),
                {k: v / len(paths) for k, v in stage_totals.items()})


def _scorers(det: Detector, folder: Path) -> tuple[dict[str, _Scorer], str]:
    """PyTorch; the runtime ``inspect`` and ``serve`` choose by default (``--runtime auto``), on a
    copy loaded as they load it, with this machine's stored tuning where there is one (its threads
    then hold for every scorer); and the exported whole-model graph where export takes the model."""
    from defectlens.bundle import Bundle
    from defectlens.errors import DefectLensError
    from defectlens.export import export_onnx, exportable, load_onnx
    from defectlens.inference.loading import load_model

    model = Bundle(det).save(folder / "model.dlens")
    loaded = load_model(model)
    tuning = loaded.tuning
    scorers = {"torch": _Scorer(det), "runtime": _Scorer(loaded.detector, *((tuning.batch_size, tuning.decode_workers) if tuning else ()))}
    try:
        exportable(det)
    except DefectLensError:
        pass
    else:
        scorers["export"] = _Scorer(load_onnx(export_onnx(Bundle(det), folder / "model.onnx"), batch_size=det.batch_size).detector)
    return scorers, loaded.runtime.line().removeprefix("runtime: ")


def _agreement(run: _Run, torch_run: _Run) -> dict:
    return {"images_per_s": run.images_per_s, "latency_ms_median": run.latency_ms, "stage_ms": run.stage_ms,
            "max_score_diff": float(np.abs(run.scores - torch_run.scores).max()), "max_map_diff": float(np.abs(run.maps - torch_run.maps).max())}


def result_dict(result: BenchmarkResult) -> dict:
    return {**asdict(result), "versions": library_versions()}
