"""One table comparing detectors and backbones over every category of a data root.

`defectlens benchmark ROOT --detectors patchcore,padim --backbones mobilenet_v2,...` fits every
combination on every category found, and measures it the way users choose a method: image
AUROC, pixel AUROC, AUPRO, F1-max, fit seconds, milliseconds per image and peak memory. Each run
is its own child process, so its peak memory is its own and one run's failure (a detector that
cannot fit this data) becomes a row with the reason, not a lost table.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from defectlens.data.datasets import GOOD
from defectlens.errors import DatasetError, DefectLensError

MAX_DEPTH = 3
AUTO = "auto"  # not a detector: the choice `fit` makes among them
T = TypeVar("T")


def find_categories(root: str | Path) -> list[Path]:
    """Category folders under ``root`` (MVTec ``train/good`` or plain ``good/``), or ``root`` itself."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")

    def walk(path: Path, depth: int) -> list[Path]:
        if (path / "train" / GOOD).is_dir() or (path / GOOD).is_dir():
            return [path]
        if depth == MAX_DEPTH:
            return []
        found: list[Path] = []
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found += walk(sub, depth + 1)
        return found

    categories = walk(root, 0)
    if not categories:
        raise DatasetError(f"{root}: no category folders (train/good or good/) within {MAX_DEPTH} levels")
    return categories


@dataclass
class Row:
    category: str
    detector: str
    backbone: str
    image_auroc: float | None = None
    pixel_auroc: float | None = None
    aupro: float | None = None
    f1_max: float | None = None
    fit_s: float | None = None
    ms_per_image: float | None = None
    peak_mb: float | None = None
    error: str = ""


def _run_one(category: str, label: str, detector: str, backbone: str, params: dict) -> Row:
    """Runs in a fresh child process."""
    from defectlens.bundle import Bundle
    from defectlens.data import load_dataset
    from defectlens.data.datasets import labelled_split
    from defectlens.detectors import create_from_spec
    from defectlens.detectors.base import SUPERVISED
    from defectlens.evaluation.evaluate import evaluate
    from defectlens.workflows import select_detector

    row = Row(label, detector, backbone)
    try:
        ds = load_dataset(category, validation_fraction=0.0)
        t0 = time.perf_counter()
        budget = params.pop("budget_s", 300.0)
        if detector == AUTO:  # chosen as plain `fit` chooses; the time spent choosing counts as fitting
            sel = select_detector(ds.train_good, backbone=backbone, image_size=params.get("image_size", 256), budget_s=budget,
                                  seed=params.get("random_state", 0))
            det = sel.chosen.build(random_state=params.get("random_state", 0))
            row.detector = f"auto: {sel.chosen.label}"
        else:
            det = create_from_spec(detector, {**params, "backbone": backbone})
        if "backbones" in det.get_params():  # an ensemble names its own backbones
            row.backbone = str(det.get_params().get("backbones", "-"))
        if det.learning == SUPERVISED:  # learns from half the labelled test split, judged on the rest
            goods, defects = labelled_split(ds, 0.5, 0)
            seen = {s.path for s in goods + defects}
            det.fit(ds.train_good + [s.path for s in goods + defects], [0] * (len(ds.train_good) + len(goods)) + [1] * len(defects))
            ds.test = [s for s in ds.test if s.path not in seen]
        else:
            det.fit(ds.train_good)
        row.fit_s = time.perf_counter() - t0
        result = evaluate(Bundle(det), ds)
        m = result.metrics
        row.image_auroc, row.pixel_auroc, row.aupro, row.f1_max = m["image_auroc"], m["pixel_auroc"], m["aupro"], m["f1_max"]
        row.ms_per_image = result.timings["ms_per_image"]
    except DefectLensError as exc:
        row.error = str(exc)
    except Exception as exc:  # noqa: BLE001 -- one broken run (out of memory, a bug) must not lose the whole table
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    row.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return row


KILLED = "the run's process was killed (out of memory?)"


# What a run's process needs imported: a fork server imports it once, and each run forks from it.
PRELOAD = ["defectlens.evaluation.comparison", "defectlens.evaluation.scaling", "defectlens.evaluation.selection_benchmark",
           "defectlens.evaluation.threshold_benchmark"]
_context: Any = None


def _fresh_context() -> Any:
    """A fork server: a clean process, started once, that has imported torch and the detectors but
    run nothing. Forking a run from it takes a fraction of a second, where a spawned interpreter
    spent about 3 s importing torch for every row of a table."""
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a process of its own, forked from the fork server: its peak memory is its
    own and it shares no torch threads or fitted state with the caller or other runs. A child
    killed from outside (usually by the kernel, for memory) raises BrokenProcessPool."""
    with ProcessPoolExecutor(max_workers=1, mp_context=_fresh_context()) as pool:
        return pool.submit(_as_caller, os.getcwd(), dict(os.environ), fn, *args).result()


def _as_caller(cwd: str, environ: dict[str, str], fn: Callable[..., T], *args: Any) -> T:
    """A forked run starts in the fork server's folder and environment, those of the first run:
    it takes the caller's current ones, as a spawned interpreter would have."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    return fn(*args)


def each_category(root: str | Path, title: str, fn: Callable[..., T], args: tuple, failed: Callable[[str], T],
                  describe: Callable[[T], str], progress: Callable[[str], Any] = print) -> list[T]:
    """``fn(category, label, *args)`` for every category under ``root``, each in a fresh process;
    a killed process becomes ``failed(label)``, and each result is shown as it comes."""
    root = Path(root)
    found = []
    for category in find_categories(root):
        label = category.relative_to(root).as_posix() if category != root else category.name
        progress(f"{title}: {label}")
        try:
            entry = in_fresh_process(fn, str(category), label, *args)
        except BrokenProcessPool:
            entry = failed(label)
        found.append(entry)
        progress(describe(entry))
    return found


def compare(root: str | Path, detectors: list[str], backbones: list[str], params: dict | None = None, progress=print) -> list[Row]:
    from defectlens.backbones import get_spec
    from defectlens.detectors import detector_class

    root = Path(root)
    for d in detectors:
        for part in d.split(":"):
            if part != AUTO:
                detector_class(part)  # unknown names fail before hours of fitting
    for b in backbones:
        get_spec(b)
    categories = find_categories(root)
    progress(HEADER)
    rows = []
    for category in categories:
        label = category.relative_to(root).as_posix() if category != root else category.name
        for det in detectors:
            for bb in backbones:
                try:
                    row = in_fresh_process(_run_one, str(category), label, det, bb, dict(params or {}))
                except BrokenProcessPool:
                    row = Row(label, det, bb, error=KILLED)
                rows.append(row)
                progress(format_row(row))
    return rows


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


HEADER = "| category | detector | backbone | image AUROC | pixel AUROC | AUPRO | F1-max | fit s | ms/image | peak MB |"


def format_row(r: Row) -> str:
    if r.error:
        return f"| {r.category} | {r.detector} | {r.backbone} | failed: {r.error.replace('|', '/')} |" + " |" * 6
    return (f"| {r.category} | {r.detector} | {r.backbone} | {_f(r.image_auroc)} | {_f(r.pixel_auroc)} | {_f(r.aupro)} | "
            f"{_f(r.f1_max)} | {_f(r.fit_s, 1)} | {_f(r.ms_per_image, 1)} | {_f(r.peak_mb, 0)} |")


def markdown(rows: list[Row], machine: str) -> str:
    lines = [f"Machine: {machine}", "", HEADER, "|" + "---|" * 10]
    lines += [format_row(r) for r in rows]
    best = {}
    for r in rows:
        if r.image_auroc is not None and (r.category not in best or r.image_auroc > best[r.category].image_auroc):
            best[r.category] = r
    if best:
        lines += ["", "Best image AUROC per category: " + "; ".join(f"{c} {b.detector}/{b.backbone} {b.image_auroc:.3f}" for c, b in best.items())]
    return "\n".join(lines) + "\n"


def write(rows: list[Row], out_dir: Path, machine: str) -> tuple[Path, Path]:
    from defectlens.jsonutil import finite

    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "benchmark.md", out_dir / "benchmark.json"
    md.write_text(markdown(rows, machine))
    js.write_text(json.dumps(finite({"machine": machine, "rows": [asdict(r) for r in rows]}), indent=2))
    return md, js
