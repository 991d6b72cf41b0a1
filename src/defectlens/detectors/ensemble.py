"""Ensembles: several detectors or backbones, their standardised maps averaged.

Different backbones see different things (MobileNetV2 and EfficientNet-Lite were trained with
different recipes and resolutions), and different detectors fail differently (PaDiM models each
position, PatchCore none): averaging their evidence steadies the score on parts where one of them
is weak. Each member's scores live on its own scale, so each is standardised by the mean and
spread of its scores on (up to ``norm_images``) training images before fusing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from defectlens.data.images import ImageInput, ModelSize, spread
from defectlens.detectors.base import Detector, PixelScores, Stopwatch, good_images_only
from defectlens.detectors.registry import create_detector, detector_class, register_detector
from defectlens.errors import DefectLensError


@register_detector
class EnsembleDetector(Detector):
    """Parameters
    ----------
    detector : the registered detector each member runs (patchcore, padim), or several,
        comma-separated (``patchcore,padim``): one member each.
    backbones : comma-separated backbone names, one member each; one name is shared by every
        detector, and one detector runs on every backbone.
    detector_params : settings for the members; each member takes those it has (not image_size,
        set here).
    member_params : settings for each member in turn, over ``detector_params``. k-fold calibration
        gives the fold models what each deployed member chose from its data (a SimpleNet member's
        pooling), as members may choose differently.
    image_size, batch_size : shared, so every member sees the same pixels and maps align.
    norm_images : training images scored after fitting to standardise each member.
    """

    name = "ensemble"

    def __init__(self, detector: str = "patchcore", backbones: str = "mobilenet_v2,efficientnet_lite0", detector_params: dict | None = None,
                 member_params: list[dict] | None = None, image_size: ModelSize = 256, batch_size: int = 2, norm_images: int = 32,
                 verbose: bool = False) -> None:
        self.detector = detector
        self.backbones = backbones
        self.detector_params = detector_params
        self.member_params = member_params
        self.image_size = image_size
        self.batch_size = batch_size
        self.norm_images = norm_images
        self.verbose = verbose

    def _names(self) -> list[tuple[str, str]]:
        """(detector, backbone) of each member."""
        detectors = [d.strip() for d in self.detector.split(",") if d.strip()]
        backbones = [b.strip() for b in self.backbones.split(",") if b.strip()]
        if len(detectors) > 1 and len(backbones) > 1 and len(detectors) != len(backbones):
            raise DefectLensError(f"give one backbone, or one per detector: {self.detector!r} on {self.backbones!r}")
        n = max(len(detectors), len(backbones))
        if n < 2 or not detectors or not backbones:
            raise DefectLensError(f"an ensemble needs at least two members, got detector {self.detector!r} on {self.backbones!r}")
        if any(detector_class(d) is EnsembleDetector for d in detectors):
            raise DefectLensError("an ensemble's members cannot be ensembles")
        return [(detectors[i % len(detectors)], backbones[i % len(backbones)]) for i in range(n)]

    def _members(self) -> list[Detector]:
        params = {**(self.detector_params or {}), "image_size": self.image_size, "batch_size": self.batch_size, "verbose": self.verbose}
        names = self._names()
        per_member = self._given_per_member(len(names))
        mixed = len({d for d, _ in names}) > 1  # then each takes only its own settings; alone, a wrong one is an error
        members = []
        for (name, backbone), given in zip(names, per_member, strict=True):
            own = {**params, "backbone": backbone, **given}
            if mixed:
                accepted = detector_class(name)._get_param_names()
                own = {k: v for k, v in own.items() if k in accepted}
            members.append(create_detector(name, **own))
        return members

    def fit(self, images: Sequence[ImageInput], labels: Sequence[int] | None = None) -> EnsembleDetector:
        good_images_only(self, labels)
        images = list(images)
        members = self._members()
        if not images:
            raise DefectLensError("fit needs at least one good image, got none")
        self.members_ = [m.fit(images) for m in members]
        sample = spread(images, self.norm_images)
        stats = []
        for m in self.members_:
            scores, maps = m.score(sample)
            stats.append([scores.mean(), max(scores.std(), 1e-6 * abs(scores.mean()) + 1e-12),
                          maps.mean(), max(maps.std(), 1e-6 * abs(maps.mean()) + 1e-12)])
        self.norm_ = np.asarray(stats, dtype=np.float64)  # per member: score mean, std, map mean, std
        return self

    def chosen_params(self) -> dict:
        self._require_fitted()
        choices = [m.chosen_params() for m in self.members_]
        if not any(choices):
            return {}
        return {"member_params": [{**g, **c} for g, c in zip(self._given_per_member(len(choices)), choices, strict=True)]}

    def _given_per_member(self, n: int) -> list[dict]:
        """``member_params`` as given, or no settings for each of the ``n`` members."""
        given = self.member_params or [{}] * n
        if len(given) != n:
            raise DefectLensError(f"member_params gives {len(given)} members' settings for an ensemble of {n}")
        return given

    @property
    def learns_incrementally(self) -> bool:
        members = getattr(self, "members_", None)
        return members is not None and all(m.learns_incrementally for m in members)

    def partial_fit(self, images: Sequence[ImageInput]) -> EnsembleDetector:
        """Every member learns the images; each keeps the standardisation it was fitted with, so
        the fused score stays on the scale the threshold was set on."""
        self._require_fitted()
        if not self.learns_incrementally:
            return super().partial_fit(images)
        images = list(images)
        for m in self.members_:
            m.partial_fit(images)
        return self

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, watch: Stopwatch | None = None) -> PixelScores:
        watch = watch or Stopwatch()
        scores, maps = 0.0, 0.0
        for m, (s_mu, s_sd, m_mu, m_sd) in zip(self.members_, self.norm_, strict=True):
            s, mp, _ = m.score_pixels(pixels, watch)
            scores = scores + (s - s_mu) / s_sd
            maps = maps + (mp - m_mu) / m_sd
        k = len(self.members_)
        return PixelScores((np.asarray(scores) / k).astype(np.float32), (np.asarray(maps) / k).astype(np.float32), None)

    def get_state(self) -> dict[str, np.ndarray]:
        self._require_fitted()
        state = {"norm": self.norm_}
        for i, m in enumerate(self.members_):
            state.update({f"m{i}.{k}": v for k, v in m.get_state().items()})
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> EnsembleDetector:
        members = self._members()
        self.members_ = [m.set_state({k[len(f"m{i}.") :]: v for k, v in state.items() if k.startswith(f"m{i}.")}) for i, m in enumerate(members)]
        self.norm_ = np.asarray(state["norm"], dtype=np.float64)
        if self.norm_.shape != (len(members), 4):
            raise DefectLensError("saved ensemble state does not match its members")
        return self


__all__ = ["EnsembleDetector"]
