"""Choosing a fitted model's thresholds again, without refitting: what `calibrate` does.

Without data, good-only rules reuse the good (and synthetic) scores stored in the model. With a
data set, its good images the model was not fitted on are scored; labelled rules also take a
share of its labelled test images, which are recorded so that evaluation leaves them out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectlens.bundle import Bundle
from defectlens.calibration.settings import LABELLED, CalibrationSettings
from defectlens.data.datasets import Dataset, labelled_split
from defectlens.errors import DatasetError
from defectlens.workflows.fitting import SYNTHETIC_DEFECTS, ScoredImages, SyntheticScores, calibrate_bundle, score_images, synthetic_scores


def needs_data(settings: CalibrationSettings) -> bool:
    return settings.strategy in LABELLED or bool(settings.symmetry)


def recalibrate_stored(bundle: Bundle, settings: CalibrationSettings, model: str = "model") -> Bundle:
    """A good-only rule applied to the scores the model file keeps."""
    if needs_data(settings):
        raise DatasetError(f"strategy '{settings.strategy}'{' with symmetry' if settings.symmetry else ''} needs DATA with labelled defect images")
    old = bundle.calibration
    if old is None or not old.good_map_max:
        raise DatasetError(f"{model}: holds no stored good scores to re-calibrate from: give DATA")
    zeros = np.zeros(old.n_good)
    good = ScoredImages(np.asarray(old.good_scores), np.asarray(old.good_map_max), zeros, zeros)
    n_syn = len(old.synthetic_scores)
    syn = SyntheticScores(ScoredImages(np.asarray(old.synthetic_scores), *(np.zeros(n_syn),) * 3), list(old.synthetic_families)) if n_syn else None
    calibrate_bundle(bundle, good, settings, source=old.source.replace("+labelled", ""), files=[f for f in old.files if f], synthetic=syn)
    bundle.calibration.symmetry = old.symmetry  # the stored scores already include it, when it was chosen
    return bundle


def recalibrate_from_history(bundle: Bundle, confirmed: list[dict], images: Path, settings: CalibrationSettings,
                             model: str = "model") -> Bundle:
    """Thresholds from the stored good scores and the defects operators confirmed on the line
    (``confirmed``: history rows with their feedback's defect type), whose kept copies lie under
    ``images``: labelled rules, and defect typing when two or more types were named."""
    old = bundle.calibration
    if old is None or not old.good_map_max:
        raise DatasetError(f"{model}: holds no stored good scores to calibrate from")
    if old.symmetry and old.symmetry.get("used"):
        raise DatasetError(f"{model}: its stored good scores include a symmetry term; re-calibrate it with DATA instead")
    paths, types, missing = [], [], 0
    for row in confirmed:
        path = images / row["image_path"] if row.get("image_path") else None
        if path is None or not path.is_file():
            missing += 1
            continue
        paths.append(path)
        types.append(row.get("defect_type"))
    if not paths:
        raise DatasetError(f"{model}: no confirmed defect with a kept image under {images} ({missing} confirmed without one); "
                           "serve with --keep-images and mark defects on the dashboard first")
    zeros = np.zeros(old.n_good)
    good = ScoredImages(np.asarray(old.good_scores), np.asarray(old.good_map_max), zeros, zeros)
    n_syn = len(old.synthetic_scores)
    syn = SyntheticScores(ScoredImages(np.asarray(old.synthetic_scores), *(np.zeros(n_syn),) * 3), list(old.synthetic_families)) if n_syn else None
    # Types teach only when every defect has one (an unnamed one is no class of its own); one named
    # type keeps the typer the model has, two or more teach a new one.
    named = types if all(types) else []
    calibrate_bundle(bundle, good, settings, paths, named, source=old.source.replace("+labelled", ""), files=[f for f in old.files if f], synthetic=syn)
    bundle.calibration.notes.append(f"labelled rules from {len(paths)} defects confirmed on the line"
                                    + (f" ({missing} confirmed defects had no kept image)" if missing else ""))
    return bundle


def recalibrate_on(bundle: Bundle, ds: Dataset, settings: CalibrationSettings, labelled_fraction: float = 0.5, seed: int = 0) -> Bundle:
    """Thresholds from the data set's good images the model never saw (and, for labelled rules,
    a per-type share of its labelled test images)."""
    fitted = set(bundle.metadata.get("train_files", []))
    unseen = [p for p in ds.train_good + ds.validation if str(p.resolve()) not in fitted]
    good_test, defects = labelled_split(ds, labelled_fraction, seed) if needs_data(settings) else ([], [])
    good_paths = unseen + [s.path for s in good_test]
    if not good_paths:
        raise DatasetError(f"{ds.root}: every good image was used to fit this model; add unseen good images, or re-calibrate without DATA")
    bundle.detector.verbose = True
    try:
        good = score_images(bundle.detector, good_paths, progress=True)
        syn = synthetic_scores(bundle.detector, good_paths, SYNTHETIC_DEFECTS, settings.seed)
        # resolved paths, so evaluation recognises these images however the data folder is named
        calibrate_bundle(bundle, good, settings, [s.path.resolve() for s in defects], [s.defect_type for s in defects], source="holdout",
                         files=[str(p.resolve()) for p in good_paths], synthetic=syn)
    finally:
        bundle.detector.verbose = False
    return bundle
