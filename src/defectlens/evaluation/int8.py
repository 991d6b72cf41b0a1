"""`defectlens benchmark DATA --int8`: an int8 backbone against float32, per category.

Both models run their embedder in ONNX Runtime, so the comparison is between precisions, not
runtimes; each has its memory bank built through its own embedder (export.quantize says why).
Accuracy is read on the real test split, which neither model saw, and judged by the rule
issue 15 set for keeping int8: image AUROC within 0.005 of float32 and anomaly maps correlating
0.99 or more with float32's.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from defectlens.data.datasets import load_dataset
from defectlens.data.images import iter_batches
from defectlens.detectors import create_detector
from defectlens.detectors.patchcore import PatchCore
from defectlens.errors import DefectLensError
from defectlens.export.quantize import quantize_embedder
from defectlens.export.runtime import embedder_graph, install_embedder
from defectlens.metrics import image_auroc

AUROC_TOLERANCE = 0.005
MAP_CORRELATION = 0.99
PASSES = 3  # each model scores the test split this often, taking turns; the median pass is kept


@dataclass
class Int8Result:
    dataset: str
    machine: str
    images: int
    feature_correlation: float  # int8 against float32 embeddings of the calibration images
    auroc_float: float
    auroc_int8: float
    map_correlation: float  # per test image, averaged
    images_per_s_float: float  # the detector's scoring, decoding included
    images_per_s_int8: float

    @property
    def kept(self) -> bool:
        return abs(self.auroc_int8 - self.auroc_float) <= AUROC_TOLERANCE and self.map_correlation >= MAP_CORRELATION

    def row(self) -> str:
        return (f"| {self.dataset} | {self.images} | {self.feature_correlation:.3f} | {self.auroc_float:.4f} | {self.auroc_int8:.4f} | "
                f"{self.map_correlation:.3f} | {self.images_per_s_float:.1f} | {self.images_per_s_int8:.1f} | {'yes' if self.kept else 'no'} |")

    def to_dict(self) -> dict:
        return {**asdict(self), "kept": self.kept}


HEADER = ("| category | test images | embedding correlation | image AUROC float32 | image AUROC int8 | map correlation | "
          "images/s float32 | images/s int8 | kept by the rule |\n|---|---|---|---|---|---|---|---|---|")


def run_int8(data: str | Path, params: dict | None = None, machine: str = "") -> Int8Result:
    ds = load_dataset(data, validation_fraction=0.0)
    train = list(ds.train_good)
    fitted = create_detector("patchcore", **(params or {})).fit(train)
    if not isinstance(fitted, PatchCore):  # pragma: no cover -- the registry's patchcore is this class
        raise DefectLensError("--int8 measures PatchCore")
    int8 = copy.deepcopy(fitted)
    install_embedder(fitted, embedder_graph(fitted))
    install_embedder(int8, quantize_embedder(int8, train))
    int8.fit_bank(train)
    probe = next(iter_batches(train[:8], fitted.image_size, 8)).pixels
    with torch.inference_mode():
        a, b = (m._embed(torch.from_numpy(probe)).numpy().ravel() for m in (fitted, int8))
    paths = [s.path for s in ds.test]
    labels = np.array([s.label for s in ds.test])
    scored = {name: model.score(paths) for name, model in (("float", fitted), ("int8", int8))}
    rates: dict[str, list[float]] = {"float": [], "int8": []}
    for _ in range(PASSES):
        for name, model in (("float", fitted), ("int8", int8)):
            t0 = time.perf_counter()
            model.score(paths)
            rates[name].append(len(paths) / (time.perf_counter() - t0))
    maps_f, maps_q = scored["float"][1], scored["int8"][1]
    return Int8Result(ds.name, machine, len(paths), float(np.corrcoef(a, b)[0, 1]),
                      image_auroc(labels, scored["float"][0]), image_auroc(labels, scored["int8"][0]),
                      float(np.nanmean([np.corrcoef(f.ravel(), q.ravel())[0, 1] for f, q in zip(maps_f, maps_q, strict=True)])),
                      statistics.median(rates["float"]), statistics.median(rates["int8"]))
