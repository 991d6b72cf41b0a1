"""The interface every detector implements, scikit-learn style.

The constructor only stores settings; ``fit`` learns from good images and returns ``self``;
learned state ends in ``_``. ``get_state``/``set_state`` move learned state in and out as
plain arrays so a bundle can save any detector without pickle.
"""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from sklearn.base import BaseEstimator
from tqdm.auto import tqdm

from defectlens.data.images import DECODE_WORKERS, Batch, ImageInput, ModelSize, format_size, iter_batches, size_hw
from defectlens.errors import DefectLensError

if TYPE_CHECKING:
    from defectlens.calibration.record import Calibration


class PixelScores(NamedTuple):
    """What a detector gives for preprocessed images (n, 3, height, width)."""

    scores: np.ndarray  # (n,) image scores
    maps: np.ndarray  # (n, size, size) anomaly maps at the model input size
    features: np.ndarray | None  # (n, d, h, w) patch embeddings where the detector has them, for region typing


GOOD_ONLY = "good-only"  # learns from good images; labels, if given, must all be 0
SUPERVISED = "supervised"  # learns from good and defect images: fit(images, labels)


def good_images_only(detector: Detector, labels: Sequence[int] | None) -> None:
    """The check every good-only detector's fit starts with: a defect label is a mistake to report, not to ignore."""
    if labels is not None and any(int(v) != 0 for v in labels):
        raise DefectLensError(f"{detector.name} learns from good images only: give it no defect images (labels must all be 0)")


@dataclass
class BatchScores:
    """Scores of one batch: image scores (n,), maps (n, size, size) at the model input size."""

    batch: Batch
    scores: np.ndarray
    maps: np.ndarray
    features: np.ndarray | None = None  # (n, d, h, w) patch embeddings, for region typing
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage, for the whole batch


class Stopwatch:
    """Accumulates wall time per named stage, in milliseconds."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + (now - self._t) * 1000.0
        self._t = now


def check_size(size: ModelSize, low: int, high: int) -> None:
    """A model size both of whose sides the backbones' strides divide, within what fits in memory."""
    if not all(low <= side <= high and side % 16 == 0 for side in size_hw(size)):
        raise DefectLensError(f"image_size: each side must be a multiple of 16 between {low} and {high}, got {format_size(size)}")


def _carry_thread_settings() -> Callable[[], None]:
    """What a new thread must be told to score as the caller's would: torch's intra-op threads are
    shared by the process, but OpenMP's thread count is per thread, so faiss (when loaded: a
    PatchCore's search) would otherwise run on its default or on torch's count, not on the count
    the tuning set."""
    faiss = sys.modules.get("faiss")
    if faiss is None:
        return lambda: None
    threads = faiss.omp_get_max_threads()

    def carry() -> None:
        torch.get_num_threads()  # torch sets OpenMP's count in each thread on first use: let it, then set faiss's
        faiss.omp_set_num_threads(threads)

    return carry


class Detector(BaseEstimator, ABC):
    """Base class: subclasses set ``name`` and implement fit, score_pixels, get/set_state.

    ``learning`` declares what ``fit(images, labels=None)`` learns from: ``good-only`` detectors
    refuse defect labels, ``supervised`` ones need them (the workflows split data accordingly).
    """

    name: str = ""
    learning: str = GOOD_ONLY
    scores_include_calibration: bool = False  # an export's graph already adds the symmetry term
    image_size: ModelSize  # a side, or (height, width)
    batch_size: int
    verbose: bool

    @abstractmethod
    def fit(self, images: Sequence[ImageInput], labels: Sequence[int] | None = None) -> Detector:
        """Learn from ``images`` (labels 0 = good, 1 = defect, for supervised detectors); returns self."""

    @abstractmethod
    def score_pixels(self, pixels: torch.Tensor, watch: Stopwatch | None = None) -> PixelScores:
        """Scores, maps and (where the detector has them) patch embeddings of preprocessed images
        (n, 3, height, width) in [0, 1]; ``watch`` collects time per stage."""

    @abstractmethod
    def get_state(self) -> dict[str, np.ndarray]:
        """Learned state as named arrays (what a bundle stores)."""

    @abstractmethod
    def set_state(self, state: dict[str, np.ndarray]) -> Detector:
        """Restore learned state saved by :meth:`get_state`; returns self."""

    def chosen_params(self) -> dict[str, Any]:
        """The settings this fit chose from its data (given as "auto"), as the values it chose.

        k-fold calibration fits its fold models with them: the scores a threshold is set on must
        come from the model that will judge the line, and a fold model that chose differently
        scores on another scale, where the threshold would then be set."""
        return {}

    def _inner_choices(self, inner: Detector) -> dict[str, Any]:
        """A wrapper's chosen_params: its inner detector's choices, carried in its ``detector_params``."""
        choices = inner.chosen_params()
        return {"detector_params": {**(getattr(self, "detector_params", None) or {}), **choices}} if choices else {}

    @property
    def learns_incrementally(self) -> bool:
        """Whether :meth:`partial_fit` can teach a fitted model more good images without a refit
        (what operator feedback on the line uses); the others queue such images for the next fit."""
        return False

    def partial_fit(self, images: Sequence[ImageInput]) -> Detector:
        """Learn more good ``images`` on top of what ``fit`` learned; returns self."""
        raise DefectLensError(f"{self.name} cannot learn new images without a refit: fit it again with them")

    @property
    def is_fitted(self) -> bool:
        return any(k.endswith("_") and not k.startswith("_") for k in vars(self))

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise DefectLensError(f"{type(self).__name__} is not fitted: call fit() or load a bundle first")

    def score_batches(self, images: Sequence[ImageInput], skip_errors: bool = False, progress: bool = False,
                      preview_side: int = 0, batch_size: int | None = None, workers: int = DECODE_WORKERS) -> Iterator[BatchScores]:
        """Stream scores batch by batch: memory stays flat however many images there are.
        ``preview_side`` also keeps a small copy of each image from the same read, for overlays.
        ``batch_size`` (else the detector's own) and ``workers`` (decoding threads) change speed only:
        what ``benchmark --tune`` measured on this machine.

        With more than one batch, the next is scored in a thread while the caller handles this one:
        the Inspector's verdicts, regions and records run in the caller's thread, and in turn with
        scoring they left a core idle for about a tenth of each batch (the Inspector row of
        ``benchmark --end-to-end`` at 82-88 % of scoring; 86-102 % ahead). One batch, as for a
        single image, is scored in the caller's thread: there is nothing to overlap."""
        self._require_fitted()
        batch_size = batch_size or self.batch_size
        batches = iter_batches(images, self.image_size, batch_size, workers, skip_errors, preview_side)
        with tqdm(total=len(images), desc="scoring", unit="img", disable=not progress, leave=False) as bar:
            if len(images) <= batch_size:
                watch = Stopwatch()
                for batch in batches:
                    watch.lap("decode")
                    yield self._delivered(self._score_batch(batch, watch.ms), bar)
                return
            with ThreadPoolExecutor(1, thread_name_prefix="scoring", initializer=_carry_thread_settings()) as pool:
                ahead: Future[BatchScores] | None = None
                while True:
                    watch = Stopwatch()
                    try:
                        batch = next(batches, None)
                    except Exception:
                        if ahead is not None:  # what was scored before an unreadable image is still handed out
                            yield self._delivered(ahead.result(), bar)
                        raise
                    watch.lap("decode")
                    scoring = pool.submit(self._score_batch, batch, watch.ms) if batch is not None else None
                    if ahead is not None:
                        yield self._delivered(ahead.result(), bar)
                    if scoring is None:
                        return
                    ahead = scoring

    def _score_batch(self, batch: Batch, decode_ms: dict[str, float]) -> BatchScores:
        if len(batch.indices) == 0:
            return BatchScores(batch, np.zeros(0, np.float32), np.zeros((0, *size_hw(self.image_size)), np.float32), None, decode_ms)
        watch = Stopwatch()
        with torch.inference_mode():  # per thread
            scores, maps, features = self.score_pixels(torch.from_numpy(batch.pixels), watch)
        return BatchScores(batch, scores, maps, features, {**decode_ms, **watch.ms})

    @staticmethod
    def _delivered(out: BatchScores, bar: tqdm) -> BatchScores:
        bar.update(len(out.batch.indices) + len(out.batch.errors))
        return out

    def decision_scores(self, scores: np.ndarray, maps: np.ndarray, calibration: Calibration | None) -> np.ndarray:
        """The scores thresholds apply to: appearance, plus the calibration's symmetry term."""
        if calibration is None or self.scores_include_calibration:
            return np.asarray(scores, dtype=np.float64)
        return calibration.combine(scores, maps)

    def score(self, images: Sequence[ImageInput], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (N,) and anomaly maps (N, size, size) for all images, in input order."""
        scores, maps = [], []
        for out in self.score_batches(images, progress=progress):
            scores.append(out.scores)
            maps.append(out.maps)
        if not scores:
            return np.zeros(0, np.float32), np.zeros((0, *size_hw(self.image_size)), np.float32)
        return np.concatenate(scores), np.concatenate(maps)
