"""Autoencoders trained from scratch on good images: anomalies are what they cannot rebuild.

No pretrained features, so they work where ImageNet features mean little (X-ray, depth maps,
unusual textures), at the price of training on the CPU and, on natural-looking parts, lower
accuracy than PatchCore or PaDiM: the benchmark table says how much, per data set.

Two networks: a plain convolutional autoencoder (everything through an 8x8 bottleneck) and a
U-Net whose skip connections pass through narrow 1x1 convolutions, so fine detail helps the
reconstruction without letting the network copy defects straight through. Loss: MSE + (1 -
SSIM), optionally plus a perceptual term on frozen backbone features. The anomaly map sums the
per-pixel squared error and SSIM dissimilarity, each in units of its level on good images,
smoothed like every other detector's map. Training stops early when the held-out good images'
loss stops improving, and before an epoch would overrun ``max_seconds`` (180 s: with loading and
scoring, fitting stays within 5 minutes on a 2-core CPU).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlens.data.images import ImageInput, iter_batches
from defectlens.detectors.anomaly_map import AnomalyMapHead, gaussian_kernel1d
from defectlens.detectors.base import Detector, PixelScores, Stopwatch, good_images_only
from defectlens.detectors.registry import register_detector
from defectlens.errors import DefectLensError

ARCHITECTURES = ("conv", "unet")


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), _block(cin, cout, 1))


class ConvAE(nn.Module):
    """Four stride-2 stages down to an 8x8 (at 128 px) bottleneck and back."""

    widths = (32, 64, 128, 256)

    def __init__(self, latent: int = 64, skips: bool = False) -> None:
        super().__init__()
        w = self.widths
        self.down = nn.ModuleList([_block(3 if i == 0 else w[i - 1], w[i], 2) for i in range(4)])
        self.squeeze = nn.Conv2d(w[3], latent, 1)
        self.expand = nn.Conv2d(latent, w[3], 1)
        self.skips = nn.ModuleList([nn.Conv2d(w[i], 8, 1) for i in range(3)]) if skips else None
        extra = 8 if skips else 0
        self.up = nn.ModuleList([_up(w[3], w[2]), _up(w[2] + extra, w[1]), _up(w[1] + extra, w[0]), _up(w[0] + extra, 16)])
        self.out = nn.Conv2d(16, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = x
        for d in self.down:
            h = d(h)
            feats.append(h)
        h = self.expand(F.leaky_relu(self.squeeze(h), 0.1))
        for i, u in enumerate(self.up):
            if self.skips is not None and i > 0:  # narrow skips from the stage at this resolution
                h = torch.cat([h, self.skips[3 - i](feats[3 - i])], dim=1)
            h = u(h)
        return torch.sigmoid(self.out(h))


class _SSIM(nn.Module):
    """Per-pixel SSIM (Gaussian window, sigma 1.5) averaged over channels."""

    def __init__(self) -> None:
        super().__init__()
        k = gaussian_kernel1d(1.5)
        self.register_buffer("window", (k[:, None] * k[None, :]).expand(3, 1, -1, -1).contiguous())

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        pad = self.window.shape[-1] // 2

        def blur(t: torch.Tensor) -> torch.Tensor:
            return F.conv2d(F.pad(t, (pad,) * 4, mode="reflect"), self.window, groups=3)

        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        c1, c2 = 0.01**2, 0.03**2
        ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        return ssim.mean(dim=1)


@register_detector
class Autoencoder(Detector):
    """Parameters
    ----------
    architecture : "conv" (plain) or "unet" (narrow skip connections).
    image_size : training and scoring size (a multiple of 16; 128-256 keeps CPU training short).
    latent : bottleneck channels.
    max_epochs, max_seconds : training stops at whichever comes first...
    patience : ...or when the held-out loss has not improved for this many epochs.
    validation_fraction : good images held out for early stopping.
    learning_rate, batch_size : Adam settings.
    ssim_weight : weight of (1 - SSIM) next to MSE in the loss.
    perceptual_weight : weight of the MSE between frozen ``backbone`` features of input and
        reconstruction (0 = off); the backbone is needed only while training.
    smoothing_sigma : Gaussian sigma of the map, in pixels at image_size.
    random_state : seeds weights, shuffling and the held-out split.
    """

    name = "autoencoder"

    def __init__(self, architecture: str = "unet", image_size: int = 128, latent: int = 64, max_epochs: int = 60, max_seconds: float = 180.0,
                 patience: int = 6, validation_fraction: float = 0.1, learning_rate: float = 2e-3, batch_size: int = 16, ssim_weight: float = 1.0,
                 perceptual_weight: float = 0.0, backbone: str = "mobilenet_v2", smoothing_sigma: float = 2.0, random_state: int = 0,
                 verbose: bool = False) -> None:
        self.architecture = architecture
        self.image_size = image_size
        self.latent = latent
        self.max_epochs = max_epochs
        self.max_seconds = max_seconds
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.ssim_weight = ssim_weight
        self.perceptual_weight = perceptual_weight
        self.backbone = backbone
        self.smoothing_sigma = smoothing_sigma
        self.random_state = random_state
        self.verbose = verbose

    def _validate_params(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise DefectLensError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if not (isinstance(self.image_size, int) and 32 <= self.image_size <= 1024 and self.image_size % 16 == 0):
            raise DefectLensError(f"image_size must be one side (the autoencoder is square), a multiple of 16 between 32 and 1024, got {self.image_size}")
        if self.max_epochs < 1 or self.batch_size < 1 or self.latent < 1:
            raise DefectLensError("max_epochs, batch_size and latent must be at least 1")

    def _network(self) -> ConvAE:
        return ConvAE(self.latent, skips=self.architecture == "unet")

    def _load(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([b.pixels for b in iter_batches(images, self.image_size, 16)]))

    def _loss(self, x: torch.Tensor, y: torch.Tensor, features: nn.Module | None) -> torch.Tensor:
        loss = F.mse_loss(y, x) + self.ssim_weight * (1 - self._ssim(y, x).mean())
        if features is not None:
            loss = loss + self.perceptual_weight * sum(F.mse_loss(a, b) for a, b in zip(features(y), features(x), strict=True))
        return loss

    def fit(self, images: Sequence[ImageInput], labels: Sequence[int] | None = None) -> Autoencoder:
        good_images_only(self, labels)
        self._validate_params()
        images = list(images)
        if not images:
            raise DefectLensError("fit needs at least one good image, got none")
        torch.manual_seed(self.random_state)
        gen = torch.Generator().manual_seed(self.random_state)
        data = self._load(images)
        order = torch.randperm(len(data), generator=gen)
        n_val = int(round(len(data) * self.validation_fraction)) if len(data) >= 5 else 0
        val, train = data[order[:n_val]], data[order[n_val:]]
        self._ssim = _SSIM()
        features = None
        if self.perceptual_weight > 0:
            from defectlens.backbones import create_backbone

            features, _ = create_backbone(self.backbone)
        net = self._network()
        opt = torch.optim.Adam(net.parameters(), lr=self.learning_rate)
        history: dict[str, list[float]] = {"train": [], "val": []}
        best, best_state, stale, start = float("inf"), None, 0, time.perf_counter()
        for epoch in range(self.max_epochs):
            net.train()
            perm = torch.randperm(len(train), generator=gen)
            total = 0.0
            for i in range(0, len(train), self.batch_size):
                x = train[perm[i : i + self.batch_size]]
                loss = self._loss(x, net(x), features)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(x)
            history["train"].append(total / len(train))
            net.eval()
            with torch.no_grad():
                held = val if len(val) else train[:8]
                v = float(self._loss(held, net(held), features))
            history["val"].append(v)
            if self.verbose:
                print(f"epoch {epoch + 1}: train {history['train'][-1]:.4f}  held-out {v:.4f}")
            if v < best - 1e-5:
                best, stale = v, 0
                best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
            else:
                stale += 1
            elapsed = time.perf_counter() - start
            # stop before an epoch that would overrun the budget, not after it
            if stale >= self.patience or elapsed * (epoch + 2) / (epoch + 1) > self.max_seconds:
                break
        assert best_state is not None
        net.load_state_dict(best_state)
        self.network_ = net.eval()
        self.history_ = {k: np.asarray(v, dtype=np.float64) for k, v in history.items()}
        self.train_seconds_ = time.perf_counter() - start
        self._map_head = AnomalyMapHead(self.image_size, self.smoothing_sigma)
        with torch.no_grad():  # the level of each error on good images: the units of the map
            l2, ssim = self._errors(data[: min(len(data), 64)])
        self.error_scale_ = np.array([float(l2.mean()) + 1e-12, float(ssim.mean()) + 1e-12])
        return self

    def _errors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.network_(x)
        return ((x - y) ** 2).mean(dim=1), 1 - self._ssim(x, y)

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, watch: Stopwatch | None = None) -> PixelScores:
        watch = watch or Stopwatch()
        l2, ssim = self._errors(pixels)
        watch.lap("network")
        raw = l2 / float(self.error_scale_[0]) + ssim / float(self.error_scale_[1])
        maps = self._map_head(raw)  # already at image_size: only the smoothing acts
        scores = maps.reshape(len(maps), -1).max(dim=1).values
        watch.lap("postprocess")
        return PixelScores(scores.numpy().astype(np.float32), maps.numpy(), None)

    def get_state(self) -> dict[str, np.ndarray]:
        self._require_fitted()
        state = {f"net.{k}": v.numpy() for k, v in self.network_.state_dict().items()}
        state.update({"error_scale": self.error_scale_, "history_train": self.history_["train"], "history_val": self.history_["val"],
                      "train_seconds": np.asarray([self.train_seconds_])})
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> Autoencoder:
        self._validate_params()
        net = self._network()
        weights = {k[4:]: torch.from_numpy(np.array(v)) for k, v in state.items() if k.startswith("net.")}
        try:
            net.load_state_dict(weights)
        except RuntimeError:
            raise DefectLensError(f"saved autoencoder weights do not fit a '{self.architecture}' network of latent {self.latent}") from None
        self.network_ = net.eval()
        self.error_scale_ = np.asarray(state["error_scale"], dtype=np.float64)
        self.history_ = {"train": np.asarray(state["history_train"]), "val": np.asarray(state["history_val"])}
        self.train_seconds_ = float(state["train_seconds"][0])
        self._ssim = _SSIM()
        self._map_head = AnomalyMapHead(self.image_size, self.smoothing_sigma)
        return self


__all__ = ["Autoencoder", "ConvAE"]
