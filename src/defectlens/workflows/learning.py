"""Learning confirmed-good images on the line, without a refit: new model versions.

An operator confirms that a rejected part was good. Detectors that can (``learns_incrementally``)
take the image into what they know; the result is a new bundle saved next to the old one as
``<name>.v<N>.dlens``, recording its parent's checksum and the feedback it learned from, so a
line can always go back. The threshold is not moved: it was set on calibration images, and the
images learned from never join them. Instead the calibration images are scored again by the old
and the new model, and each stored (unseen) good score is moved by the change the new model made
to that image, which is what the expected false-reject rate is then re-estimated from; synthetic
defects made from the same images show how recall moved.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone

from defectlens.bundle import SUFFIX, Bundle
from defectlens.calibration.record import Calibration
from defectlens.calibration.strategies import conformal_bound, estimate_frr
from defectlens.data.images import ImageInput
from defectlens.detectors import Detector
from defectlens.errors import DefectLensError
from defectlens.workflows.fitting import SYNTHETIC_DEFECTS, score_images, synthetic_scores

VERSIONED = re.compile(r"^(?P<base>.+)\.v(?P<version>[0-9]+)$")


class CannotLearn(DefectLensError):
    """The model's detector cannot take new images without a refit, or the images teach it nothing."""


def split_version(stem: str) -> tuple[str, int]:
    """``bottle.v3`` -> (``bottle``, 3); a file without a version is version 1."""
    found = VERSIONED.match(stem)
    return (found["base"], int(found["version"])) if found else (stem, 1)


def version_path(path: Path, version: int) -> Path:
    base, _ = split_version(path.stem if path.suffix == SUFFIX else path.name)
    return path.with_name(f"{base}{SUFFIX}" if version == 1 else f"{base}.v{version}{SUFFIX}")


def next_version(path: Path) -> int:
    """One above every version of this model in its folder, so no version is ever overwritten."""
    base, own = split_version(path.stem)
    found = [split_version(p.stem) for p in path.parent.glob(f"{glob.escape(base)}*{SUFFIX}")]
    return max([own] + [v for b, v in found if b == base]) + 1


@dataclass
class Recheck:
    """The threshold re-checked on the calibration images after learning."""

    n: int
    threshold: float
    frr_bound_before: float  # conformal: (good scores above + 1) / (n + 1)
    frr_bound_after: float
    expected_frr_before: float  # tail model
    expected_frr_after: float
    synthetic_recall_before: float | None = None
    synthetic_recall_after: float | None = None


@dataclass
class LearnReport:
    path: Path
    version: int
    parent: str  # file name of the parent version
    parent_checksum: str
    learned_images: int
    feedback_ids: list[int]
    recheck: Recheck | None
    notes: list[str] = field(default_factory=list)
    checksum: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out

    def describe(self) -> str:
        lines = [f"learned {self.learned_images} good image(s) -> {self.path.name} (version {self.version}, parent {self.parent})"]
        r = self.recheck
        if r is not None:
            lines.append(f"  threshold {r.threshold:.4f} kept; re-checked on {r.n} calibration images: expected false-reject rate "
                         f"{100 * r.expected_frr_before:.2f} % -> {100 * r.expected_frr_after:.2f} % "
                         f"(bound {100 * r.frr_bound_before:.1f} % -> {100 * r.frr_bound_after:.1f} %)")
            if r.synthetic_recall_before is not None and r.synthetic_recall_after is not None:
                lines.append(f"  recall on synthetic defects {100 * r.synthetic_recall_before:.1f} % -> {100 * r.synthetic_recall_after:.1f} %")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def calibration_images(bundle: Bundle) -> list[str]:
    """The images the stored good scores came from, in their order, or [] when not recorded.

    Held-out calibration records its files; k-fold calibration scored every fitted image, which
    the metadata lists."""
    cal = bundle.calibration
    if cal is None:
        return []
    if cal.files and len(cal.files) >= cal.n_good and not cal.source.startswith("kfold"):
        return list(cal.files[: cal.n_good])
    train = bundle.metadata.get("train_files") or []
    if cal.source.startswith("kfold") and len(train) == len(cal.good_scores):
        return list(train)
    return []


def learn_good(bundle: Bundle, images: Sequence[ImageInput], parent_path: Path, feedback_ids: Sequence[int] = (),
               calibration: Sequence[ImageInput] | None = None) -> tuple[Bundle, LearnReport]:
    """A new version of ``bundle`` that has also learned ``images`` (confirmed good), saved next to
    ``parent_path``; the parent file is left as it was."""
    detector = bundle.detector
    if not detector.learns_incrementally:
        raise CannotLearn(f"{detector.name} cannot learn new images without a refit: refit with them "
                          "(the feedback stays in the history for that)")
    images = list(images)
    if not images:
        raise DefectLensError("nothing to learn: no images given")
    # Both copies: the running detector keeps serving inspections (under its lock) while these score.
    before_model = clone(detector).set_params(verbose=False).set_state(detector.get_state())
    learner = clone(detector).set_params(verbose=False).set_state(detector.get_state())  # a few images: no progress bars
    learner.partial_fit(images)
    taught_before, taught_after = before_model.score(images)[0], learner.score(images)[0]
    if np.allclose(taught_before, taught_after, rtol=0, atol=1e-7):
        raise CannotLearn("the model already knows parts like these (learning them changes no score): if they are rejected, "
                          "the threshold is what rejects them; no new version written")
    cal_images = list(calibration) if calibration is not None else calibration_images(bundle)
    missing = [p for p in cal_images if isinstance(p, str) and not Path(p).is_file()]
    new_cal, recheck, notes = bundle.calibration, None, []
    unchecked = "the threshold's false-reject rate was not re-checked"
    if bundle.calibration is None:
        notes.append("the model has no calibration: nothing to re-check")
    elif not cal_images:
        notes.append(f"the model does not record its calibration images: {unchecked}")
    elif missing:
        notes.append(f"calibration images not reachable ({len(missing)} of {len(cal_images)} missing, e.g. {missing[0]}): {unchecked}")
    elif calibration is not None and len(cal_images) != len(bundle.calibration.good_scores):
        notes.append(f"{len(cal_images)} calibration images given for {len(bundle.calibration.good_scores)} stored scores: {unchecked}")
    else:
        new_cal, recheck = _recheck(bundle.calibration, before_model, learner, cal_images)
    version = next_version(parent_path)
    lineage = {"version": version, "parent": parent_path.name, "parent_checksum": bundle.checksum, "feedback_ids": list(feedback_ids),
               "learned_images": len(images), "learned_at": datetime.now(timezone.utc).isoformat(),
               "root_checksum": bundle.metadata.get("lineage", {}).get("root_checksum", bundle.checksum)}
    history = [*bundle.metadata.get("learned", []), lineage]
    child = Bundle(learner, new_cal, {**bundle.metadata, "lineage": lineage, "learned": history}, bundle.typer)
    for _ in range(100):  # another writer may take a number between looking and writing: take the next
        path = version_path(parent_path, version)
        try:
            child.save(path, exclusive=True)
            break
        except FileExistsError:
            version = next_version(parent_path)
            lineage["version"] = version
    else:
        raise DefectLensError(f"{parent_path}: could not find a free version number to save under")
    report = LearnReport(path, version, parent_path.name, bundle.checksum, len(images), list(feedback_ids), recheck, notes, child.checksum)
    return child, report


def _recheck(cal: Calibration, old: Detector, new: Detector, images: list) -> tuple[Calibration, Recheck]:
    """Move each stored good score by what learning changed for that image, then re-estimate."""
    before = score_images(old, images).decision(cal.symmetry)
    after = score_images(new, images).decision(cal.symmetry)
    stored = np.asarray(cal.good_scores, dtype=np.float64)
    moved = stored + (after - before)
    thr = cal.image_threshold
    recheck = Recheck(len(images), thr, conformal_bound(stored, thr), conformal_bound(moved, thr),
                      estimate_frr(stored, thr).expected, estimate_frr(moved, thr).expected)
    syn_old = synthetic_scores(old, images, SYNTHETIC_DEFECTS, 0)
    if syn_old is not None:
        syn_new = synthetic_scores(new, images, SYNTHETIC_DEFECTS, 0)
        assert syn_new is not None
        recheck.synthetic_recall_before = float(cal.rejects(syn_old.scored.decision(cal.symmetry)).mean())
        recheck.synthetic_recall_after = float(cal.rejects(syn_new.scored.decision(cal.symmetry)).mean())
    note = (f"learned on the line: good scores moved by the new model's change on each calibration image "
            f"(expected false-reject rate {100 * recheck.expected_frr_before:.2f} % -> {100 * recheck.expected_frr_after:.2f} %)")
    updated = replace(cal, good_scores=[float(v) for v in moved], expected_frr=estimate_frr(moved, thr).to_dict(), notes=[*cal.notes, note])
    return updated, recheck


__all__ = ["CannotLearn", "LearnReport", "Recheck", "calibration_images", "learn_good", "next_version", "split_version", "version_path"]
