"""Where the good scores for calibration come from, and fitting a model together with them.

A threshold is only honest if the good scores it is set on come from images the model was not
fitted on (a training image scores near zero). Three ways to get them:

* holdout: a share of the good images is kept out of fitting (enough images: the default);
* k-fold: with few images, k models are fitted on k-1 folds each and score the fold left out;
  the final model is then fitted on all images, so no image is wasted;
* one image: the model is fitted on the image and some flips and rotations of it, and
  calibrated on other small rotations, shifts and brightness changes it has not seen.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from sklearn.base import clone
from sklearn.model_selection import KFold

from defectlens.bundle import Bundle
from defectlens.calibration.calibrate import MIN_RECOMMENDED_IMAGES, calibrate_scores, pixel_threshold_for
from defectlens.calibration.defect_types import DefectTyper, evidence_weights, pool_features
from defectlens.calibration.settings import SCHEMES, CalibrationSettings
from defectlens.calibration.symmetry import asymmetry, choose_weight
from defectlens.data.datasets import GOOD, Dataset, labelled_split
from defectlens.data.defects import defects_from
from defectlens.data.images import ImageInput, load_rgb
from defectlens.detectors.base import SUPERVISED
from defectlens.errors import DefectLensError

if TYPE_CHECKING:
    from defectlens.detectors import Detector

# Fold models see (k-1)/k of the images and score high against the deployed model: 10 folds
# measured tighter than 5 on small sets (benchmark --thresholds), and as good as leave-one-out
FOLDS = 10
SYNTHETIC_DEFECTS = 64  # made from the good calibration images, to estimate recall at each threshold


@dataclass
class ScoredImages:
    """What calibration needs of each image: score, map maximum, mirror asymmetry."""

    scores: np.ndarray
    map_max: np.ndarray
    asym_lr: np.ndarray
    asym_tb: np.ndarray
    features: np.ndarray | None = None  # pooled defect-evidence embeddings (n, d), for typing

    def asym(self, axes: str) -> np.ndarray:
        parts = ([self.asym_lr] if "lr" in axes else []) + ([self.asym_tb] if "tb" in axes else [])
        return np.max(parts, axis=0)

    def decision(self, symmetry: dict | None) -> np.ndarray:
        """The scores thresholds apply to: appearance, plus the symmetry term when calibration chose it."""
        if symmetry and symmetry.get("used"):
            return self.scores + symmetry["weight"] * self.asym(symmetry["axes"])
        return np.asarray(self.scores, dtype=np.float64)

    @classmethod
    def concat(cls, parts: Sequence[ScoredImages]) -> ScoredImages:
        arrays = [np.concatenate([getattr(p, f) for p in parts]) for f in ("scores", "map_max", "asym_lr", "asym_tb")]
        features = np.concatenate([p.features for p in parts]) if all(p.features is not None for p in parts) else None
        return cls(*arrays, features)

    def take(self, order: np.ndarray) -> ScoredImages:
        features = None if self.features is None else self.features[order]
        return ScoredImages(self.scores[order], self.map_max[order], self.asym_lr[order], self.asym_tb[order], features)


def score_images(detector: Detector, images: Sequence[ImageInput], progress: bool = False, pool_above: float | None = None) -> ScoredImages:
    """Streamed, so calibrating on thousands of images never holds their maps in memory.

    With ``pool_above`` (a pixel threshold), also pool each image's patch embeddings over its
    evidence above that level: the description of its defect that typing learns from.
    """
    parts = []
    for out in detector.score_batches(list(images), progress=progress):
        features = None
        if pool_above is not None and out.features is not None:
            features = np.stack([pool_features(f, evidence_weights(m, pool_above)) for f, m in zip(out.features, out.maps, strict=True)])
        parts.append(ScoredImages(out.scores.astype(np.float64), out.maps.reshape(len(out.maps), -1).max(axis=1).astype(np.float64),
                                  asymmetry(out.maps, "lr"), asymmetry(out.maps, "tb"), features))
    if not parts:
        raise DefectLensError("no images to calibrate on")
    return ScoredImages.concat(parts)


@dataclass
class SyntheticScores:
    """Scores of synthetic defects made from good calibration images: an estimate of recall."""

    scored: ScoredImages
    families: list[str]

    @classmethod
    def concat(cls, parts: Sequence[SyntheticScores]) -> SyntheticScores:
        return cls(ScoredImages.concat([p.scored for p in parts]), [f for p in parts for f in p.families])


def synthetic_scores(detector: Detector, good_images: Sequence[ImageInput], n: int, seed: int = 0) -> SyntheticScores | None:
    """Score about ``n`` synthetic defects made from ``good_images`` (which ``detector`` must not have been fitted on)."""
    if n <= 0 or not len(good_images):
        return None
    _, defects = defects_from(list(good_images), n, seed)
    return SyntheticScores(score_images(detector, [d.image for d in defects]), [d.family for d in defects])


def fold_prototype(fitted: Detector) -> Detector:
    """What a k-fold calibration's fold models are cloned from: the deployed model's settings,
    with what its fit chose from the data fixed to its choices (:meth:`Detector.chosen_params`)."""
    return clone(fitted).set_params(**fitted.chosen_params())


def kfold_scores(detector: Detector, images: Sequence[ImageInput], folds: int, seed: int = 0, synthetic: int = 0,
                 on_fold: Callable[[Detector, np.ndarray], None] | None = None) -> tuple[ScoredImages, SyntheticScores | None]:
    """Out-of-fold scores: each image scored by a model fitted without it; with ``synthetic``,
    also synthetic defects made from each fold's left-out images, scored by that fold's model.
    ``on_fold(model, left_out_indices)`` sees each fold's model before it is dropped (the
    threshold benchmark measures the fold models' bias against the deployed one with it)."""
    images = list(images)
    folds = min(folds, len(images))
    if folds < 2:
        raise DefectLensError("k-fold calibration needs at least 2 good images")
    parts, order, syn = [], [], []
    for fold, (train_idx, test_idx) in enumerate(KFold(folds, shuffle=True, random_state=seed).split(images)):
        model = clone(detector).set_params(verbose=False).fit([images[i] for i in train_idx])
        left_out = [images[i] for i in test_idx]
        parts.append(score_images(model, left_out))
        order.extend(test_idx)
        syn.append(synthetic_scores(model, left_out, math.ceil(synthetic / folds), seed + fold))
        if on_fold is not None:
            on_fold(model, test_idx)
    syn = [s for s in syn if s is not None]
    return ScoredImages.concat(parts).take(np.argsort(order)), SyntheticScores.concat(syn) if syn else None


def single_image_views(image: ImageInput, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Views to fit on and disjoint views to calibrate on, from one good image.

    Rotations and shifts reflect at the border, so no black corners appear that the model
    would learn as normal or flag as defects.
    """
    rgb = load_rgb(image)
    rng = np.random.default_rng(seed)

    def rotate(a: np.ndarray, deg: float) -> np.ndarray:
        return np.clip(ndimage.rotate(a, deg, axes=(1, 0), reshape=False, order=1, mode="reflect"), 0, 1)

    def shift(a: np.ndarray, frac: tuple[float, float]) -> np.ndarray:
        return ndimage.shift(a, (frac[0] * a.shape[0], frac[1] * a.shape[1], 0), order=1, mode="reflect")

    fit = [rgb, rgb[:, ::-1], rgb[::-1, :], rgb[::-1, ::-1]] + [rotate(rgb, d) for d in (-4.0, -2.0, 2.0, 4.0)]
    calib = [rotate(rgb, d) for d in (-5.0, -3.0, -1.0, 1.0, 3.0, 5.0)]
    calib += [shift(rgb, tuple(rng.uniform(-0.02, 0.02, 2))) for _ in range(4)]
    calib += [np.clip(rgb * g, 0, 1) for g in (0.96, 0.98, 1.02, 1.04)]
    return [np.ascontiguousarray(v, dtype=np.float32) for v in fit], [np.ascontiguousarray(v, dtype=np.float32) for v in calib]


def resolve_scheme(scheme: str, n_train: int, n_validation: int) -> str:
    if scheme not in SCHEMES:
        raise DefectLensError(f"unknown calibration scheme '{scheme}'; choose from {', '.join(SCHEMES)}")
    if scheme != "auto":
        return scheme
    if n_train + n_validation == 1:
        return "single-image"
    return "holdout" if n_validation >= MIN_RECOMMENDED_IMAGES else "kfold"


def fit_calibrated(
    detector: Detector,
    train: Sequence[ImageInput],
    validation: Sequence[ImageInput] = (),
    settings: CalibrationSettings | None = None,
    *,
    scheme: str = "auto",
    folds: int = FOLDS,
    defects: Sequence[ImageInput] = (),
    defect_types: Sequence[str] = (),
    metadata: dict | None = None,
    synthetic: int = SYNTHETIC_DEFECTS,
) -> Bundle:
    """Fit ``detector`` on good images and calibrate it, choosing how to get unseen good scores.

    ``auto`` holds out ``validation`` when it has 10+ images, uses k-fold over all good images
    when there are fewer, and the augmented single-image set-up for one image. ``synthetic``
    defects are made from the same unseen good images and scored by the same model, to estimate
    recall at each threshold (0: none).
    """
    settings = settings or CalibrationSettings()
    train, validation = list(train), list(validation)
    scheme = resolve_scheme(scheme, len(train), len(validation))
    calib_files: list[str] = []
    if scheme == "holdout":
        if not validation:
            raise DefectLensError("holdout calibration needs held-out good images (raise the validation fraction, or use kfold)")
        detector.fit(train)
        good = score_images(detector, validation, progress=detector.verbose)
        syn = synthetic_scores(detector, validation, synthetic, settings.seed)
        source = "holdout"
        calib_files = [str(v) for v in validation if not isinstance(v, np.ndarray)]
    elif scheme == "kfold":
        everything = train + validation
        detector.fit(everything)  # first: the fold models take the settings it chose from the data
        good, syn = kfold_scores(fold_prototype(detector), everything, folds, settings.seed, synthetic)
        source = f"kfold-{min(folds, len(everything))}"
        calib_files = [str(v) for v in everything if not isinstance(v, np.ndarray)]  # out-of-fold scores keep their order
    else:
        if len(train) + len(validation) != 1:
            raise DefectLensError("the single-image set-up takes exactly one good image")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 'few images' warning: the set-up is chosen knowingly
            fit_views, calib_views = single_image_views((train + validation)[0], settings.seed)
        warnings.warn("fitting on a single good image (augmented): expect more false rejects than with 10+ images", stacklevel=2)
        detector.fit(fit_views)
        good = score_images(detector, calib_views)
        syn = synthetic_scores(detector, calib_views, synthetic, settings.seed)
        source = "single-image-augmented"
    bundle = Bundle(detector, None, dict(metadata or {}))
    calibrate_bundle(bundle, good, settings, defects, defect_types, source, calib_files, syn)
    return bundle


def calibrate_detector(detector: Detector, good_images: Sequence[ImageInput], settings: CalibrationSettings | None = None,
                       metadata: dict | None = None) -> Bundle:
    """Package a fitted detector with thresholds set on held-out good images (not the ones it was fitted on)."""
    settings = settings or CalibrationSettings()
    files = [str(p) for p in good_images if not isinstance(p, np.ndarray)]
    good = score_images(detector, list(good_images), progress=detector.verbose)
    synthetic = synthetic_scores(detector, list(good_images), SYNTHETIC_DEFECTS, settings.seed)  # recall estimate, as fit makes
    return calibrate_bundle(Bundle(detector, None, dict(metadata or {})), good, settings, files=files, synthetic=synthetic)


def calibrate_bundle(
    bundle: Bundle,
    good: ScoredImages,
    settings: CalibrationSettings,
    defects: Sequence[ImageInput] = (),
    defect_types: Sequence[str] = (),
    source: str = "holdout",
    files: Sequence[str] = (),
    synthetic: SyntheticScores | None = None,
) -> Bundle:
    """Set the bundle's calibration from unseen good scores, and, when labelled defects are
    given, use them for the labelled rules, the symmetry decision and defect typing.
    ``synthetic`` scores estimate recall and feed the cost rule."""
    detector = bundle.detector
    defect = None
    if len(defects):
        if len(defect_types) and len(defect_types) != len(defects):
            raise DefectLensError("give one defect type per defect image")
        defect = score_images(detector, list(defects), progress=detector.verbose, pool_above=pixel_threshold_for(good.map_max, settings))
    good_scores = good.scores
    defect_scores = defect.scores if defect is not None else None
    syn_scores = synthetic.scored.scores if synthetic is not None else None
    symmetry = None
    if settings.symmetry:
        if defect is None:
            warnings.warn("symmetry break needs labelled defects to prove it helps; not used", stacklevel=2)
        else:
            symmetry = {"axes": settings.symmetry, **choose_weight(good.scores, good.asym(settings.symmetry), defect.scores, defect.asym(settings.symmetry))}
            if symmetry["used"]:
                good_scores = good.decision(symmetry)
                defect_scores = defect.decision(symmetry)
                if synthetic is not None:
                    syn_scores = synthetic.scored.decision(symmetry)
    defect_files = [str(d) for d in defects if not isinstance(d, np.ndarray)]
    types = list(defect_types) if defect is not None and len(defect_types) else None
    calibration = calibrate_scores(good_scores, good.map_max, settings, defect_scores=defect_scores, defect_types=types,
                                   synthetic_scores=syn_scores, synthetic_families=synthetic.families if synthetic is not None else (),
                                   source=source + ("+labelled" if defect is not None else ""), files=list(files) + defect_files)
    calibration.symmetry = symmetry
    bundle.calibration = calibration
    if types is not None and len(set(types)) >= 2:  # new labels replace the typer; without any, it is kept
        if defect.features is None:
            warnings.warn(f"{detector.name} gives no patch embeddings: regions are typed by shape only", stacklevel=2)
        else:
            bundle.typer = DefectTyper(random_state=settings.seed).fit(defect.features, np.asarray(types))
    return bundle


def fit_dataset(detector: Detector, ds: Dataset, settings: CalibrationSettings | None = None, scheme: str = "auto", folds: int = FOLDS,
                extra: dict | None = None) -> Bundle:
    """What `fit` does with a data set: fit and calibrate, recording which files the model saw so
    that re-calibration and evaluation can leave them out."""
    settings = settings or CalibrationSettings()
    if detector.learning == SUPERVISED:
        return fit_supervised(detector, ds, settings)
    scheme = resolve_scheme(scheme, len(ds.train_good), len(ds.validation))
    fitted_on = ds.train_good if scheme == "holdout" else ds.train_good + ds.validation
    meta = {"name": ds.name, "data": str(ds.root), "train_images": len(fitted_on),
            "train_files": [str(p.resolve()) for p in fitted_on], "calibration_scheme": scheme, **(extra or {})}
    return fit_calibrated(detector, ds.train_good, ds.validation, settings, scheme=scheme, folds=folds, metadata=meta)


def fit_supervised(detector: Detector, ds: Dataset, settings: CalibrationSettings) -> Bundle:
    """A classifier learns from half the labelled test images (split per defect type); they are
    recorded, so `evaluate` judges it only on the other half."""
    goods, defects = labelled_split(ds, 0.5, 0)
    images = ds.train_good + [s.path for s in goods] + [s.path for s in defects]
    labels = [0] * (len(ds.train_good) + len(goods)) + [1] * len(defects)
    if not ds.validation:
        raise DefectLensError(f"{ds.root}: no held-out good images to calibrate on (raise --validation-fraction)")
    detector.fit(images, labels)
    meta = {"name": ds.name, "data": str(ds.root), "train_images": len(images), "train_files": [str(Path(p).resolve()) for p in images],
            "calibration_scheme": "holdout", "labelled_defects": {t: sum(s.defect_type == t for s in defects) for t in ds.defect_types if t != GOOD}}
    bundle = calibrate_detector(detector, ds.validation, settings, metadata=meta)
    bundle.calibration.files += [str(Path(s.path).resolve()) for s in goods + defects]
    return bundle
