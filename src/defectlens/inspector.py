"""The one public entry point for production use: a bundle in, Inspections out."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence

import numpy as np

from .bundle import Bundle
from .data.images import ImageInput, describe
from .errors import ImageError
from .inspection import Inspection, find_regions
from .postprocess import resize_map


class Inspector:
    """Scores images with a bundle's detector and turns scores into verdicts and regions.

    Named ``inspector`` rather than ``inspect`` so the module never shadows the standard
    library's ``inspect`` (which torch and pytest import).
    """

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.detector = bundle.detector
        self.calibration = bundle.calibration
        self.model_name = bundle.metadata.get("name", self.detector.name)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Inspector:
        return cls(Bundle.load(path))

    def inspect(self, image: ImageInput) -> Inspection:
        for result in self.inspect_many([image]):
            if isinstance(result, ImageError):
                raise result
            return result
        raise AssertionError("unreachable")

    def inspect_many(self, images: Sequence[ImageInput], progress: bool = False) -> Iterator[Inspection | ImageError]:
        """Yield one Inspection per image in input order, or the ImageError of an unreadable one."""
        for out in self.detector.score_batches(images, skip_errors=True, progress=progress):
            results: dict[int, Inspection | ImageError] = dict(out.batch.errors)
            n = max(1, len(out.batch.indices))
            shared = {k: v / n for k, v in out.timings_ms.items()}
            for j, i in enumerate(out.batch.indices):
                t0 = time.perf_counter()
                height, width = out.batch.sizes[j]
                inspection = self._decide(describe(images[i]), float(out.scores[j]), resize_map(out.maps[j], height, width))
                inspection.timings_ms = {**shared, "decide": (time.perf_counter() - t0) * 1000.0}
                results[i] = inspection
            for i in sorted(results):
                yield results[i]

    def _decide(self, source: str, score: float, anomaly_map: np.ndarray) -> Inspection:
        cal = self.calibration
        if cal is None:
            return Inspection(source, score, None, None, anomaly_map, None, model=self.model_name)
        is_defective = score > cal.image_threshold
        mask = anomaly_map > cal.pixel_threshold
        regions = find_regions(anomaly_map, mask) if is_defective else []
        return Inspection(source, score, cal.image_threshold, is_defective, anomaly_map, mask, regions, model=self.model_name)
