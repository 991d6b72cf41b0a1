"""The one public entry point for production use: a bundle in, Inspections out."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence

import numpy as np

from defectlens.bundle import Bundle
from defectlens.calibration.defect_types import evidence_weights, pool_features
from defectlens.data.images import DECODE_WORKERS, ImageInput, describe
from defectlens.detectors.anomaly_map import resize_map
from defectlens.errors import DefectLensError, ImageError
from defectlens.inference.inspection import MASK_METHODS, Inspection, Region, find_regions, heuristic_type, make_mask, severity
from defectlens.inference.loading import STORED, load_model
from defectlens.inference.tuning import Tuning


class Inspector:
    """Scores images with a bundle's detector and turns scores into verdicts and regions.

    Named ``inspector`` rather than ``inspect`` so the module never shadows the standard
    library's ``inspect`` (which torch and pytest import).
    """

    def __init__(self, bundle: Bundle, mask_method: str = "threshold") -> None:
        if mask_method not in MASK_METHODS:
            raise DefectLensError(f"mask method must be one of {', '.join(MASK_METHODS)}, got {mask_method!r}")
        self.bundle = bundle
        self.detector = bundle.detector
        self.calibration = bundle.calibration
        self.typer = bundle.typer
        self.mask_method = mask_method
        self.model_name = bundle.metadata.get("name", self.detector.name)
        tuning = bundle.tuning  # this machine's measured settings, where load_model applied them
        self.batch_size: int | None = tuning.batch_size if tuning else None
        self.decode_workers = tuning.decode_workers if tuning else DECODE_WORKERS

    @classmethod
    def load(cls, path: str | os.PathLike, mask_method: str = "threshold", runtime: str = "auto",
             tuning: Tuning | str | None = STORED) -> Inspector:
        return cls(load_model(path, runtime, tuning), mask_method)

    def inspect(self, image: ImageInput) -> Inspection:
        (result,) = self.inspect_many([image])
        if isinstance(result, ImageError):
            raise result
        return result

    def inspect_many(self, images: Sequence[ImageInput], progress: bool = False, preview_side: int = 0) -> Iterator[Inspection | ImageError]:
        """Yield one Inspection per image in input order, or the ImageError of an unreadable one.

        Each file is read once: its bytes' digest and, with ``preview_side``, a small copy to draw
        the overlay on ride along with the Inspection, so writers never open the file again.
        """
        for out in self.detector.score_batches(images, True, progress, preview_side, self.batch_size, self.decode_workers):
            results: dict[int, Inspection | ImageError] = dict(out.batch.errors)
            n = max(1, len(out.batch.indices))
            shared = {k: v / n for k, v in out.timings_ms.items()}
            scores = self.detector.decision_scores(out.scores, out.maps, self.calibration)
            for j, i in enumerate(out.batch.indices):
                t0 = time.perf_counter()
                height, width = out.batch.sizes[j]
                features = None if out.features is None else out.features[j]
                inspection = self._decide(describe(images[i]), float(scores[j]), resize_map(out.maps[j], height, width), features)
                inspection.timings_ms = {**shared, "decide": (time.perf_counter() - t0) * 1000.0}
                inspection.digest = out.batch.digests[j] if out.batch.digests else None
                inspection.preview = out.batch.previews[j] if out.batch.previews else None
                results[i] = inspection
            for i in sorted(results):
                yield results[i]

    def _decide(self, source: str, score: float, anomaly_map: np.ndarray, features: np.ndarray | None) -> Inspection:
        cal = self.calibration
        if cal is None:
            return Inspection(source, score, None, None, anomaly_map, None, model=self.model_name)
        is_defective = bool(cal.rejects(score))
        mask = make_mask(anomaly_map, cal.pixel_threshold, self.mask_method)
        regions: list[Region] = []
        if is_defective:
            regions, labels = find_regions(anomaly_map, mask)
            self._describe_regions(regions, labels, anomaly_map, features)
        return Inspection(source, score, cal.image_threshold, is_defective, anomaly_map, mask, regions, model=self.model_name,
                          normalised_score=float(cal.normalise(score)), confidence=cal.confidence(score))

    def _describe_regions(self, regions: list[Region], labels: np.ndarray, anomaly_map: np.ndarray, features: np.ndarray | None) -> None:
        cal = self.calibration
        assert cal is not None
        for region in regions:
            region.severity = severity(region, cal)
            region.defect_type, region.type_source = heuristic_type(region), "heuristic"
        if self.typer is None or features is None or not regions:
            return
        pooled = np.stack([pool_features(features, evidence_weights(anomaly_map, cal.pixel_threshold, labels == r.label)) for r in regions])
        names, confidence = self.typer.predict(pooled)
        for region, name, conf in zip(regions, names, confidence, strict=True):
            region.defect_type, region.type_source, region.type_confidence = name, "prototype", float(conf)
