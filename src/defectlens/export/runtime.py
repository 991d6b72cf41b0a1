"""ONNX Runtime under a .dlens model: what `inspect`, `evaluate`, `watch` and `serve` run by default
(``--runtime auto``).

The graphs are built per feature detector inside the model, not for the whole model, so every
detector ``fit --detector auto`` can pick runs on it: a tiling's inner detector, each member of
an ensemble, a global term's inner detector. The stitching of tiles, the fusing of members and
the global term stay the very Python code that ``fit`` calibrated. Each feature detector gets:

- its whole scoring as one graph (backbone, patch scoring, map) where ``export`` can express it:
  PatchCore with exact search and no reweighting, PaDiM, SimpleNet;
- otherwise its patch embedder alone (backbone, neighbourhood averaging, projection: nearly all
  the arithmetic), with the patch scoring left in PyTorch and faiss: PatchCore with an IVF index
  or reweighting, the supervised classifier.

The graphs are cached beside the model, keyed by its checksum. Each load compares the model's
decision scores and maps with PyTorch's on a few seeded images (the ONNX Runtime installed here
need not be the one that built the cache), and a model that disagrees runs in PyTorch and says why
in one line.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from defectlens._version import __version__
from defectlens.bundle import Bundle
from defectlens.detectors.base import Detector, PixelScores, Stopwatch
from defectlens.detectors.feature_based import FeatureDetector
from defectlens.errors import DefectLensError
from defectlens.export.graph import OUTPUTS, ScoringGraph, exportable
from defectlens.export.onnx_export import OPSET, trace
from defectlens.export.onnx_runtime import session
from defectlens.export.parity import PARITY, check_images

RUNTIMES = ("auto", "onnx", "torch")
CACHE_DIR = ".defectlens-cache"  # beside the model file: one folder serves every model in it
CHECK_IMAGES = 4


@dataclass
class RuntimeChoice:
    """What scores a loaded model, and the evidence for it."""

    runtime: str  # "onnx" (its embedders in ONNX Runtime) or "torch"
    reason: str  # why torch; or, for onnx, where the graphs came from
    graphs: int = 0
    score_diff: float | None = None  # largest difference from PyTorch, relative to the largest score
    map_diff: float | None = None  # the same for the maps
    seconds: float = 0.0  # what choosing took: export (when not cached) and the check
    kinds: list[str] = field(default_factory=list)  # per feature detector: "whole" scoring graph, or "backbone" only
    tuning: str = ""  # the machine's measured settings it runs with (set where the model is loaded)

    def line(self) -> str:
        return self._line() + (f"; {self.tuning}" if self.tuning else "")

    def _line(self) -> str:
        if self.runtime == "torch":
            return f"runtime: PyTorch ({self.reason})"
        graphs = ", ".join(f"{n} {kind}" for kind in ("whole", "backbone") if (n := self.kinds.count(kind)))
        head = f"runtime: ONNX Runtime ({graphs} graph{'s' * (self.graphs != 1)}, {self.reason})"
        if self.score_diff is None or self.map_diff is None:
            return f"{head}; checked against PyTorch when it was exported"
        return f"{head}; largest difference from PyTorch {self.score_diff:.1e} in score, {self.map_diff:.1e} in the map"

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "reason": self.reason, "graphs": self.graphs, "kinds": self.kinds, "score_diff": self.score_diff,
                "map_diff": self.map_diff, "seconds": round(self.seconds, 3), "tuning": self.tuning}


class OnnxEmbedder:
    """Stands in for a feature detector's fast embedder: (n, 3, s, s) pixels in, embeddings out."""

    def __init__(self, session, torch_embedder: torch.nn.Module) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name
        self.torch_embedder = torch_embedder  # what ``restore`` puts back

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(pixels.numpy(), dtype=np.float32)  # the detector hands over channels-last
        return torch.from_numpy(self.session.run(None, {self.input: x})[0])


def feature_leaves(detector: Detector) -> Iterator[FeatureDetector]:
    """Every fitted feature detector inside ``detector``: itself, or what its wrappers hold in their
    learned attributes (a tiling's inner detector, an ensemble's members, a global term's inner)."""
    if isinstance(detector, FeatureDetector):
        yield detector
        return
    for key, value in vars(detector).items():
        if not key.endswith("_"):
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, Detector):
                yield from feature_leaves(item)


def _whole(leaf: FeatureDetector) -> bool:
    try:
        exportable(leaf)
    except DefectLensError:
        return False
    return True


class GraphScorer:
    """Stands in for a feature detector's PyTorch scoring: its ScoringGraph, uncalibrated, with the
    patch embeddings as a fourth output."""

    def __init__(self, session) -> None:
        self.session = session

    def __call__(self, pixels: torch.Tensor, watch: Stopwatch | None = None) -> PixelScores:
        watch = watch or Stopwatch()
        score, maps, _, features = self.session.run(None, {"images": np.ascontiguousarray(pixels.numpy(), dtype=np.float32)})
        watch.lap("graph")
        return PixelScores(score, maps, features)


def _build(leaf: FeatureDetector, whole: bool) -> bytes:
    if not whole:
        return embedder_graph(leaf)
    buffer = io.BytesIO()
    trace(ScoringGraph(leaf, None, with_features=True).eval(), leaf.image_size, [*OUTPUTS, "features"], buffer)
    return buffer.getvalue()


def embedder_graph(leaf: FeatureDetector) -> bytes:
    """The leaf's patch embedder (backbone, neighbourhood averaging, projection) as an ONNX graph."""
    buffer = io.BytesIO()
    trace(leaf._fast_embedder, leaf.image_size, ["embeddings"], buffer)
    return buffer.getvalue()


def install_embedder(leaf: FeatureDetector, graph: bytes) -> None:
    """Embed with ``graph`` in ONNX Runtime from here on (``restore`` undoes it)."""
    leaf._fast_embedder = OnnxEmbedder(session(graph), leaf._fast_embedder)


def _graph(leaf: FeatureDetector, whole: bool, cached: Path | None, use_cache: bool = True) -> tuple[bytes, bool]:
    """The leaf's graph, and whether it came from the cache (written, or written over, when built).
    A cache that cannot be written (a read-only model folder) only costs the export at every load."""
    if use_cache and cached is not None and cached.is_file():
        return cached.read_bytes(), True
    data = _build(leaf, whole)
    if cached is not None:
        tmp = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}.tmp")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, cached)  # two processes building the same graph both write it whole
        except OSError:
            tmp.unlink(missing_ok=True)
    return data, False


def _score(det: Detector, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scores, maps and (where the model gives them) patch embeddings of the check images."""
    outs = list(det.score_batches(images))
    features = [o.features for o in outs]
    return (np.concatenate([o.scores for o in outs]), np.concatenate([o.maps for o in outs]),
            np.concatenate(features) if all(f is not None for f in features) else None)


def _relative_diff(reference: np.ndarray, other: np.ndarray) -> float:
    if np.shape(reference) != np.shape(other):  # a graph of another model: other embeddings, other maps
        return float("inf")
    return float(np.abs(reference - other).max() / max(1.0, float(np.abs(reference).max())))


def restore(detector: Detector) -> None:
    """Put PyTorch back wherever ``accelerate`` put a graph."""
    for leaf in feature_leaves(detector):
        leaf._graph_scorer = None
        if isinstance(embedder := getattr(leaf, "_fast_embedder", None), OnnxEmbedder):
            leaf._fast_embedder = embedder.torch_embedder


def accelerate(bundle: Bundle, cache: Path | None = None, required: bool = False) -> RuntimeChoice:
    """Score ``bundle`` in ONNX Runtime when its graphs match PyTorch within PARITY; otherwise leave
    it in PyTorch and say why (``required``: raise instead). A cached graph that fails to load or
    to match (a damaged file, one left by another build) is built again before giving up."""
    t0 = time.perf_counter()

    def torch_because(reason: str) -> RuntimeChoice:
        restore(bundle.detector)
        if required:
            raise DefectLensError(f"--runtime onnx: {reason}")
        return RuntimeChoice("torch", reason, seconds=time.perf_counter() - t0)

    det = bundle.detector
    # a feature detector that embeds otherwise (the supervised classifier fine-tunes its own
    # network) has neither kind of graph
    leaves = [leaf for leaf in feature_leaves(det) if _whole(leaf) or getattr(leaf, "_fast_embedder", None) is not None]
    if not leaves:
        return torch_because(f"'{det.name}' models have no graph for ONNX Runtime")
    try:
        import onnxruntime  # noqa: F401 -- a missing runtime is a reason, not a crash
    except ImportError:
        return torch_because("onnxruntime is not installed")
    images = check_images(det.image_size, CHECK_IMAGES)
    ref_scores, ref_maps, ref_features = _score(det, images)
    reference = det.decision_scores(ref_scores, ref_maps, bundle.calibration), ref_maps
    # the cached graph is what this version of the exporter makes of this very model
    wholes = [_whole(leaf) for leaf in leaves]
    names = [f"{bundle.checksum[:16]}.{__version__}.opset{OPSET}.{'scoring' if whole else 'embedder'}{i}.onnx"
             for i, whole in enumerate(wholes)]
    paths = [cache / name if cache is not None and bundle.checksum else None for name in names]
    failure = ""
    for use_cache in (True, False):
        restore(det)
        cached = use_cache and any(path is not None and path.is_file() for path in paths)
        try:
            hits = _install(leaves, wholes, paths, use_cache)
            scores, maps, features = _score(det, images)
        except Exception as exc:  # noqa: BLE001 -- the exporter and ONNX Runtime raise many types; any of them means PyTorch
            failure = f"its graph could not be built or run ({type(exc).__name__}: {exc})".splitlines()[0]
            if not cached:
                break  # built now and still failing: building again would fail alike
            continue
        score_diff = _relative_diff(reference[0], det.decision_scores(scores, maps, bundle.calibration))
        map_diff = _relative_diff(reference[1], maps)
        # the patch embeddings too, where the model gives them: region typing reads them
        feature_diff = _relative_diff(ref_features, features) if ref_features is not None and features is not None else 0.0
        if max(score_diff, map_diff, feature_diff) <= PARITY:
            kinds = ["whole" if whole else "backbone" for whole in wholes]
            source = "from the cache" if hits == len(leaves) else "built now" if not hits else "built now and from the cache"
            return RuntimeChoice("onnx", source, len(leaves), score_diff, map_diff, time.perf_counter() - t0, kinds)
        failure = f"ONNX Runtime differs from PyTorch by {max(score_diff, map_diff, feature_diff):.1e} (relative), above {PARITY:g}"
        if not cached:
            break  # freshly built and still apart: building again would give the same graph
    return torch_because(failure)


def _install(leaves: list[FeatureDetector], wholes: list[bool], paths: list[Path | None], use_cache: bool) -> int:
    """Put each leaf's graph in place (its whole scoring, or its embedder); how many came from the cache."""
    hits = 0
    for leaf, whole, path in zip(leaves, wholes, paths, strict=True):
        data, hit = _graph(leaf, whole, path, use_cache)
        hits += hit
        if whole:
            leaf._graph_scorer = GraphScorer(session(data))
        else:
            install_embedder(leaf, data)
    return hits
