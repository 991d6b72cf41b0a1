"""How fit and inspect grow with training-set size and image size, and Ray against local.

`defectlens benchmark DATA --scaling` runs each point in its own fresh process (so each peak
memory is its own) and prints one table. Inspection is timed on a fixed sample of test images,
so points differ only in what is being varied.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TRAIN_SIZES = (50, 100, 200, 400, 800)
IMAGE_SIZES = (256, 512, 1024)
INSPECT_SAMPLE = 40


@dataclass
class Point:
    varied: str  # "train images" or "image size"
    train_images: int
    image_size: int
    fit_s: float = 0.0
    inspect_images_per_s: float = 0.0
    state_mib: float = 0.0  # memory bank / Gaussians, without the backbone
    peak_rss_mib: float = 0.0
    note: str = ""


def _measure_point(data: str, detector: str, params: dict, varied: str, n_train: int, size: int) -> Point:
    """Runs in a fresh child process."""
    import numpy as np

    from defectlens.data import load_dataset
    from defectlens.detectors import create_detector
    from defectlens.evaluation.benchmark import learned_state_mib

    ds = load_dataset(data, validation_fraction=0.0)
    rng = np.random.default_rng(0)
    train = [ds.train_good[i] for i in sorted(rng.choice(len(ds.train_good), n_train, replace=False))]
    test = [s.path for s in ds.test][:INSPECT_SAMPLE] or ds.train_good[:INSPECT_SAMPLE]
    det = create_detector(detector, **{**params, "image_size": size})
    point = Point(varied, n_train, size)
    t0 = time.perf_counter()
    det.fit(train)
    point.fit_s = time.perf_counter() - t0
    det.score(test[: det.batch_size])  # warm-up
    t0 = time.perf_counter()
    det.score(test)
    point.inspect_images_per_s = len(test) / (time.perf_counter() - t0)
    point.state_mib = learned_state_mib(det)
    point.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return point


def run_scaling(data: str, detector: str = "patchcore", params: dict | None = None, train_sizes=TRAIN_SIZES, image_sizes=IMAGE_SIZES,
                base_train: int = 100, progress=print) -> list[Point]:
    from defectlens.data import load_dataset
    from defectlens.evaluation.comparison import in_fresh_process

    available = len(load_dataset(data, validation_fraction=0.0).train_good)
    plan = [("train images", n, 256) for n in train_sizes]
    plan += [("image size", min(base_train, available), s) for s in image_sizes]
    points = []
    for varied, n, size in plan:
        if n > available:
            points.append(Point(varied, n, size, note=f"only {available} training images"))
        else:
            try:
                points.append(in_fresh_process(_measure_point, data, detector, dict(params or {}), varied, n, size))
            except Exception as exc:  # noqa: BLE001 -- one point failing (memory) is a finding, not the end of the table
                points.append(Point(varied, n, size, note=f"failed: {type(exc).__name__}: {exc}".splitlines()[0]))
        progress(format_point(points[-1]))
    return points


def engine_throughput(data: str, detector: str = "patchcore", params: dict | None = None, base_train: int = 100, workers: int = 0,
                      address: str | None = None) -> dict:
    """Images per second of `inspect --out` over the test images, local engine against Ray: a Ray
    started here, or the cluster at ``address`` (Ray's start-up included: that is what a user waits for)."""
    import tempfile

    from defectlens.batch.outputs import run_batch
    from defectlens.bundle import Bundle
    from defectlens.data import load_dataset
    from defectlens.detectors import create_detector
    from defectlens.inference.inspector import Inspector

    ds = load_dataset(data, validation_fraction=0.0)
    images = [s.path for s in ds.test] or ds.train_good
    figures: dict = {"images": len(images)}
    with tempfile.TemporaryDirectory() as tmp:
        model = Bundle(create_detector(detector, **dict(params or {})).fit(ds.train_good[:base_train])).save(Path(tmp) / "model.dlens")
        inspector = Inspector.load(model)
        for engine in ("local", "ray"):
            t0 = time.perf_counter()
            run_batch(inspector, images, Path(tmp) / engine, overlays=False, engine=engine, workers=workers, model_path=model,
                      address=address if engine == "ray" else None)
            figures[f"{engine}_images_per_s"] = len(images) / (time.perf_counter() - t0)
    return figures


HEADER = "| varied | train images | image size | fit s | inspect img/s | state MiB | peak MiB | note |"


def format_point(p: Point) -> str:
    if p.note and not p.fit_s:
        return f"| {p.varied} | {p.train_images} | {p.image_size} | | | | | {p.note} |"
    return (f"| {p.varied} | {p.train_images} | {p.image_size} | {p.fit_s:.1f} | {p.inspect_images_per_s:.1f} | "
            f"{p.state_mib:.1f} | {p.peak_rss_mib:.0f} | {p.note} |")


def as_dict(points: list[Point]) -> list[dict]:
    return [asdict(p) for p in points]
