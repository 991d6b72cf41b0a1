"""Supervised defect classifier for users who do have labelled defects, with Grad-CAM maps.

When a plant has collected defect photos, a classifier trained on them can beat good-only
methods on the defect kinds it has seen (and only on those: a new kind of defect may pass).
The pretrained backbone's last stage and a small head are fine-tuned with class-weighted
cross-entropy and augmentation; the decision threshold is tuned on a held-out share. Its
anomaly map is Grad-CAM (Selvaraju et al., 2017) on the last stage, so it is inspected,
evaluated and drawn like every other detector. With a global-average-pool + linear head,
Grad-CAM's channel weights are the head's weights (divided by the map's area), so the map is
computed in closed form: no backward pass at inspection time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import nn

from defectlens.backbones import create_backbone
from defectlens.calibration.strategies import threshold_f1
from defectlens.data.images import ImageInput, iter_batches
from defectlens.detectors.anomaly_map import AnomalyMapHead
from defectlens.detectors.base import SUPERVISED, PixelScores, Stopwatch
from defectlens.detectors.feature_based import FeatureDetector
from defectlens.detectors.registry import register_detector
from defectlens.errors import DefectLensError

TRAINABLE_BLOCKS = 4  # the last blocks before the stride-16 tap: the "last stage" fine-tuned


@register_detector
class SupervisedClassifier(FeatureDetector):
    """Parameters
    ----------
    backbone, weights, image_size, batch_size, smoothing_sigma, verbose : as for PatchCore.
    epochs, learning_rate : fine-tuning schedule (AdamW).
    validation_fraction : labelled images held out (stratified) to tune the threshold.
    random_state : seeds the split, augmentation and head initialisation.
    """

    name = "supervised"
    learning = SUPERVISED  # fit(images, labels): 0 = good, 1 = defect

    def __init__(self, backbone: str = "mobilenet_v2", weights: str | None = None, image_size: int = 224, epochs: int = 8,
                 learning_rate: float = 3e-4, batch_size: int = 16, validation_fraction: float = 0.2, smoothing_sigma: float = 4.0,
                 random_state: int = 0, verbose: bool = False) -> None:
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.smoothing_sigma = smoothing_sigma
        self.random_state = random_state
        self.verbose = verbose

    def _network(self, extractor: nn.Module) -> tuple[nn.Module, nn.Linear]:
        channels = extractor.channels()[-1]
        return extractor, nn.Linear(channels, 1)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (n,) and the last tap's activations (n, c, h, w)."""
        act = self.extractor_(x)[-1]
        return self.head_(act.mean(dim=(2, 3))).squeeze(1), act

    @staticmethod
    def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        gain = 1 + 0.1 * (torch.rand(len(x), 1, 1, 1, generator=gen) - 0.5)
        shift = torch.randint(-8, 9, (2,), generator=gen)
        return (x * gain).clamp(0, 1).roll((int(shift[0]), int(shift[1])), dims=(2, 3))

    def fit(self, images: Sequence[ImageInput], labels: Sequence[int] | None = None) -> SupervisedClassifier:
        self._validate_params()
        images = list(images)
        y = np.asarray(labels if labels is not None else np.zeros(len(images)), dtype=np.int64)
        if len(y) != len(images):
            raise DefectLensError(f"got {len(images)} images but {len(y)} labels")
        if (y == 1).sum() < 2 or (y == 0).sum() < 2:
            raise DefectLensError("the supervised classifier needs labelled defect images (at least 2 good and 2 defective); "
                                  "with good images only use patchcore or padim")
        torch.manual_seed(self.random_state)
        gen = torch.Generator().manual_seed(self.random_state)
        extractor, digest = create_backbone(self.backbone, self.weights)
        self.backbone_sha256_ = digest or ""
        extractor.requires_grad_(False)
        for block in list(extractor.blocks)[-TRAINABLE_BLOCKS:]:
            block.requires_grad_(True)
        self.extractor_, self.head_ = self._network(extractor)
        x_all = torch.from_numpy(np.concatenate([b.pixels for b in iter_batches(images, self.image_size, 16)]))
        idx_train, idx_val = train_test_split(np.arange(len(y)), test_size=self.validation_fraction, stratify=y, random_state=self.random_state)
        xt, yt = x_all[idx_train], torch.from_numpy(y[idx_train]).float()
        pos_weight = torch.tensor((yt == 0).sum().item() / max(1.0, (yt == 1).sum().item()))
        params = [p for p in self.extractor_.parameters() if p.requires_grad] + list(self.head_.parameters())
        opt = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=1e-4)
        self.history_ = {"train": np.zeros(self.epochs)}
        for epoch in range(self.epochs):
            # frozen blocks keep ImageNet batch statistics; only the tuned ones adapt
            self.extractor_.eval()
            for block in list(self.extractor_.blocks)[-TRAINABLE_BLOCKS:]:
                block.train()
            perm = torch.randperm(len(xt), generator=gen)
            total = 0.0
            for i in range(0, len(xt), self.batch_size):
                b = perm[i : i + self.batch_size]
                logits, _ = self._forward(self._augment(xt[b], gen))
                loss = F.binary_cross_entropy_with_logits(logits, yt[b], pos_weight=pos_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
            self.history_["train"][epoch] = total / len(xt)
            if self.verbose:
                print(f"epoch {epoch + 1}: loss {self.history_['train'][epoch]:.4f}")
        self.extractor_.eval().requires_grad_(False)
        self.head_.requires_grad_(False)
        with torch.no_grad():
            probs = torch.sigmoid(self._forward(x_all[idx_val])[0]).numpy()
        yv = y[idx_val]
        self.threshold_ = float(threshold_f1(probs[yv == 0], probs[yv == 1]))  # tuned on held-out labelled images
        self.n_train_ = np.array([(y == 0).sum(), (y == 1).sum()])
        self._map_head = AnomalyMapHead(self.image_size, self.smoothing_sigma)
        return self

    @torch.inference_mode()
    def _score_pixels(self, pixels: torch.Tensor, watch: Stopwatch | None = None) -> PixelScores:
        watch = watch or Stopwatch()
        logits, act = self._forward(pixels)
        watch.lap("backbone")
        cam = F.relu(torch.einsum("nchw,c->nhw", act, self.head_.weight[0]))
        prob = torch.sigmoid(logits)
        # each map peaks at the image's defect probability: good images stay dark
        cam = cam / cam.reshape(len(cam), -1).amax(dim=1).clamp_min(1e-8)[:, None, None]
        maps = self._map_head(cam * prob[:, None, None])
        watch.lap("postprocess")
        return PixelScores(prob.numpy().astype(np.float32), maps.numpy(), None)

    def _extractor(self) -> nn.Module:
        return self.extractor_

    def get_state(self) -> dict[str, np.ndarray]:
        self._require_fitted()
        state = self._backbone_state()
        state.update({"head.weight": self.head_.weight.numpy(), "head.bias": self.head_.bias.numpy(),
                      "threshold": np.asarray([self.threshold_]), "n_train": self.n_train_, "history_train": self.history_["train"]})
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> SupervisedClassifier:
        self._validate_params()
        self.extractor_ = self._load_extractor(state)
        _, self.head_ = self._network(self.extractor_)
        self.head_.load_state_dict({"weight": torch.from_numpy(np.array(state["head.weight"])), "bias": torch.from_numpy(np.array(state["head.bias"]))})
        self.head_.requires_grad_(False)
        self.extractor_.eval().requires_grad_(False)
        self.threshold_ = float(state["threshold"][0])
        self.n_train_ = np.asarray(state["n_train"])
        self.history_ = {"train": np.asarray(state["history_train"])}
        self._map_head = AnomalyMapHead(self.image_size, self.smoothing_sigma)
        return self

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        if "head_" in state:
            self._map_head = AnomalyMapHead(self.image_size, self.smoothing_sigma)


__all__ = ["SupervisedClassifier"]
