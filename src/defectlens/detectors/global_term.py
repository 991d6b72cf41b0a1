"""A global term for local detectors: missing, extra or misplaced parts.

PatchCore, PaDiM and SimpleNet judge each patch against good patches. A part whose every patch
looks normal but whose whole is wrong (a missing component, two where one belongs, a cable on
the wrong side) passes them. PUAD (Sugawara et al., 2024) adds an image-level term: the
Mahalanobis distance of the image's average patch embedding from the good images' Gaussian.
``GlobalTerm`` wraps any detector that returns patch embeddings and adds that distance to its
image score, in units of the local score's spread on good images, so neither term swamps the
other. The anomaly map stays the local one: the global term has no place to point at.

``fit --detector auto`` tries the winner with this term and keeps it only when it raises the
synthetic image AUROC; synthetic defects are local, so on most parts it will not be kept, and
on logical defects it may still be worth naming (``--detector global:padim``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from defectlens.data.images import ImageInput
from defectlens.detectors.base import Detector, PixelScores, Stopwatch, good_images_only
from defectlens.detectors.registry import create_detector, detector_class, register_detector
from defectlens.errors import DefectLensError

_INNER_PREFIX = "inner."
MIN_IMAGES = 4  # two halves of at least two images standardise the term out of sample


def pool(embeddings: np.ndarray) -> np.ndarray:
    """(n, d, h, w) patch embeddings -> (n, d) image descriptors."""
    return np.asarray(embeddings, dtype=np.float64).mean(axis=(2, 3))


def mahalanobis(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    diff = x - mean
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", diff, precision, diff), 0.0))


@register_detector
class GlobalTerm(Detector):
    """Parameters
    ----------
    detector : the local detector wrapped (one that returns patch embeddings: patchcore, padim, simplenet).
    detector_params : its settings.
    weight : how much one good-image spread of the global distance counts, in spreads of the
        local score (1: equally).
    """

    name = "global"

    def __init__(self, detector: str = "padim", detector_params: dict | None = None, weight: float = 1.0, verbose: bool = False) -> None:
        self.detector = detector
        self.detector_params = detector_params
        self.weight = weight
        self.verbose = verbose

    def _make_inner(self) -> Detector:
        if detector_class(self.detector) is GlobalTerm:
            raise DefectLensError("a global term cannot wrap another global term")
        return create_detector(self.detector, **{**(self.detector_params or {}), "verbose": self.verbose})

    @property
    def _inner(self) -> Detector:
        return getattr(self, "inner_", None) or self._make_inner()

    @property
    def image_size(self) -> int:  # type: ignore[override]
        return self._inner.image_size

    @property
    def batch_size(self) -> int:  # type: ignore[override]
        return self._inner.batch_size

    def fit(self, images: Sequence[ImageInput], labels: Sequence[int] | None = None) -> GlobalTerm:
        good_images_only(self, labels)
        images = list(images)
        if not images:
            raise DefectLensError("fit needs at least one good image, got none")
        if len(images) < MIN_IMAGES:
            raise DefectLensError(f"the global term needs at least {MIN_IMAGES} good images to set its scale, got {len(images)}")
        if not self.weight > 0:
            raise DefectLensError(f"weight must be > 0, got {self.weight}")
        inner = self._make_inner().fit(images)
        pooled = []
        for out in inner.score_batches(images):
            if out.features is None:
                raise DefectLensError(f"'{self.detector}' gives no patch embeddings, so it cannot take a global term")
            pooled.append(pool(out.features))
        x = np.concatenate(pooled)
        # Both scales from images a model did not see: in-sample scores run low (a memory bank
        # holds the image's own patches), which would drown one term in the other. The local
        # spread costs one more fit, on half the images.
        halves = (np.arange(len(x)) % 2 == 0, np.arange(len(x)) % 2 == 1)
        unseen = np.concatenate([mahalanobis(x[b], *self._gaussian(x[a])) for a, b in (halves, halves[::-1])])
        half = self._make_inner().fit(images[::2])
        local_unseen = half.score(images[1::2])[0].astype(np.float64)
        self.inner_ = inner
        self.global_mean_, self.global_precision_ = self._gaussian(x)
        self.global_norm_ = np.array([unseen.mean(), max(unseen.std(), 1e-12), max(local_unseen.std(), 1e-12)])
        return self

    @staticmethod
    def _gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lw = LedoitWolf().fit(x)  # shrinkage: fewer images than dimensions is the usual case
        return lw.location_, lw.precision_

    def global_scores(self, embeddings: np.ndarray) -> np.ndarray:
        """The global term of each image, in local-score units (0 at a typical good image)."""
        mu, sd, local_sd = self.global_norm_
        return self.weight * local_sd * (mahalanobis(pool(embeddings), self.global_mean_, self.global_precision_) - mu) / sd

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, watch: Stopwatch | None = None) -> PixelScores:
        watch = watch or Stopwatch()
        scores, maps, features = self.inner_.score_pixels(pixels, watch)
        total = (np.asarray(scores, dtype=np.float64) + self.global_scores(features)).astype(np.float32)
        watch.lap("global")
        return PixelScores(total, maps, features)

    def chosen_params(self) -> dict[str, Any]:
        self._require_fitted()
        return self._inner_choices(self.inner_)

    def get_state(self) -> dict[str, np.ndarray]:
        self._require_fitted()
        return {"global_mean": self.global_mean_, "global_precision": self.global_precision_, "global_norm": self.global_norm_,
                **{_INNER_PREFIX + k: v for k, v in self.inner_.get_state().items()}}

    def set_state(self, state: dict[str, np.ndarray]) -> GlobalTerm:
        try:
            mean, precision, norm = (np.asarray(state[k], dtype=np.float64) for k in ("global_mean", "global_precision", "global_norm"))
        except KeyError as exc:
            raise DefectLensError(f"saved global-term state lacks {exc}") from None
        if precision.shape != (mean.size, mean.size) or norm.shape != (3,):
            raise DefectLensError("saved global-term state is inconsistent")
        self.inner_ = self._make_inner().set_state({k[len(_INNER_PREFIX) :]: v for k, v in state.items() if k.startswith(_INNER_PREFIX)})
        self.global_mean_, self.global_precision_, self.global_norm_ = mean, precision, norm
        return self


__all__ = ["GlobalTerm", "mahalanobis", "pool"]
