"""SimpleNet (Liu et al., CVPR 2023) / SuperSimpleNet (Rolih et al., ICPR 2024): a discriminator
on frozen patch features, trained to tell good patches from synthetic anomalous ones.

Fit: embed every good training image once (the backbone is frozen), projected on the principal
axes of the patches, so the cached features are small; then train only small networks on the
cache: an adaptor (one linear layer, initialised to the identity) and a discriminator (linear,
leaky ReLU, linear) that also sees each patch's grid position. Negatives are the adapted
features of good patches changed inside Perlin-noise blobs of the patch grid (SuperSimpleNet:
anomalies are spatially coherent regions), a quarter of them changed everywhere (SimpleNet):
Gaussian noise, or, for half the images, good patches from elsewhere in the grid (so the
discriminator learns what belongs where on an aligned part). Loss: the papers' truncated L1.

Early stopping: a seeded share of the training images is held out; after every epoch the image
AUROC (largest patch logit) of those good images against synthetic defects made from them in
image space (``defectlens.data.defects``; where it is missing, against the same images with
noise blobs in their features) is measured, the best epoch's weights kept, and training stops
after ``patience`` epochs without improvement, at ``max_epochs``, or before
``max_train_seconds``.

Score: each patch's anomaly logit; the image score is the largest patch logit, the map the
upsampled, smoothed logit grid. The adaptor and the discriminator are one module
(:class:`DiscriminatorScorer`), which PyTorch inference and the ONNX graph both run.

Magnetic Tile needs what PaDiM models, a covariance per grid position: on these very features a
Gaussian per position scored 0.959, one Gaussian for all positions 0.63, and the discriminator,
though it sees positions, learned only part of that (0.78). So by default (``gaussian``) each
position's embeddings are whitened by their own Gaussian before the adaptor, and that Gaussian's
score (the whitened embedding's squared length) is a term of the logit with a learned weight:
Magnetic Tile 0.962, bottle 0.994, AITEX 0.773, DeepPCB 0.616 (``defectlens benchmark
../shared/datasets --detectors simplenet``, 2026-12-04; docs/measurements.md has both tables).

On a small set each position's covariance rests on a few patches and is blind along directions
they did not vary in; the k-fold calibration then sets the threshold on good images that vary
there. So each covariance is pooled with the mean over positions, by a share chosen per fit from
synthetic defects (``pooling``; :mod:`defectlens.detectors.position_gaussians` says why and how).
Through `fit`'s calibration (``benchmark --thresholds --detector simplenet``, three draws each of
20 and 50 images, 2026-12-07) recall over the oracle's rose from 0.61 to 0.82 on bottle and from
0.70 to 0.77 on Magnetic Tile, and no draw lost recall; at full size only bottle was pooled (image
AUROC 0.994 -> 1.000), the other data sets scored as unpooled.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from defectlens.data.images import ImageInput, ModelSize, iter_batches
from defectlens.detectors.base import PixelScores, Stopwatch, good_images_only
from defectlens.detectors.feature_based import FeatureDetector
from defectlens.detectors.position_gaussians import PoolingChoice, choose_pooling, position_gaussians, whiten
from defectlens.detectors.registry import register_detector
from defectlens.errors import DefectLensError

TRUNCATION = 0.5  # truncated L1: good patches are pushed below -0.5, noised ones above +0.5 (both papers)
PERLIN_THRESHOLD = 0.2  # SuperSimpleNet's threshold on Perlin noise in about [-0.7, 0.7]
FULL_NOISE_SHARE = 0.25  # share of negative images changed everywhere, as SimpleNet noises every patch
LEAKY_SLOPE = 0.2  # SimpleNet's discriminator
MIN_STEPS = 32  # training steps per epoch at least
QUAD_INIT = 0.5  # starting weight of the Gaussian's term (``gaussian``): one unit of it is one chi-square spread


# -- Perlin noise masks ------------------------------------------------------------------------
def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(height: int, width: int, periods: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """2-D gradient (Perlin) noise on a (height, width) grid with ``periods`` lattice cells along
    each axis: values in about [-0.7, 0.7], smooth over height / periods cells."""
    py, px = periods
    angles = 2 * np.pi * torch.rand(py + 1, px + 1, generator=gen)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (py+1, px+1, 2)
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) * py / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * px / width
    y0, x0 = ys.floor().long(), xs.floor().long()
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[(y0 + dy)[:, None], (x0 + dx)[None, :]]  # (h, w, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return top * (1 - uy) + bottom * uy


def perlin_masks(n: int, height: int, width: int, gen: torch.Generator, full_share: float = FULL_NOISE_SHARE) -> torch.Tensor:
    """n binary masks (n, height, width) of where negatives are noised: thresholded Perlin noise
    with 1 to 16 periods per axis (blobs of every size up to half the image), never empty; a
    ``full_share`` of them all ones."""
    top = max(1, int(np.log2(max(2, min(height, width) // 2))))  # at least two cells per period
    masks = torch.zeros(n, height, width)
    for i in range(n):
        if float(torch.rand(1, generator=gen)) < full_share:
            masks[i] = 1.0
            continue
        for _ in range(8):  # a blank draw (a low-amplitude field) is drawn again
            periods = tuple(int(2 ** torch.randint(0, min(top, 4) + 1, (1,), generator=gen)) for _ in range(2))
            m = perlin_noise(height, width, periods, gen) > PERLIN_THRESHOLD  # type: ignore[arg-type]
            if m.any():
                masks[i] = m.float()
                break
        else:
            masks[i] = 1.0
    return masks


# -- the scorer ----------------------------------------------------------------------------------
class DiscriminatorScorer(nn.Module):
    """Patch embeddings (n, d, h, w) -> anomaly logits (n, h, w): adaptor, then discriminator.

    With ``frequencies`` > 0 the discriminator also sees where each patch is: Fourier features
    of its grid coordinates enter the hidden layer, so one network can learn that what is good
    in one place (a part's edge at the border) is a defect in another. :meth:`folded` returns
    the inference copy, with the positional term computed once into a per-position bias of the
    hidden layer. No batch norm (SimpleNet has one after the hidden layer): it would fold away
    at inference, but on CPU it cost more than the layers themselves in training, and without it
    bottle scored the same (image AUROC 0.991 against 0.989).
    """

    encoding: torch.Tensor | None
    positional_bias: torch.Tensor | None
    center: torch.Tensor | None
    whitener: torch.Tensor | None

    def __init__(self, dim: int, hidden: int, shape: tuple[int, int], frequencies: int = 0, trainable: bool = True) -> None:
        super().__init__()
        # with ``gaussian``: each position's Gaussian, (P, d) mean and (P, d, d) whitening matrix, and
        # the learned weight of the whitened embedding's squared length (set by ``use_gaussian``)
        self.register_buffer("center", None)
        self.register_buffer("whitener", None)
        self.register_parameter("quad", None)
        self.shape = (int(shape[0]), int(shape[1]))
        self.frequencies = frequencies
        self.adaptor = nn.Linear(dim, dim)
        self.hidden = nn.Linear(dim, hidden)
        use_position = trainable and frequencies > 0
        self.position = nn.Linear(4 * frequencies, hidden, bias=False) if use_position else None
        self.out = nn.Linear(hidden, 1)
        self.register_buffer("encoding", fourier_positions(self.shape, frequencies) if use_position else None)
        self.register_buffer("positional_bias", None)  # (h * w, hidden), in the folded copy

    def use_gaussian(self, center: torch.Tensor, whitener: torch.Tensor, weight: float = QUAD_INIT) -> DiscriminatorScorer:
        self.center, self.whitener = center, whitener
        self.quad = nn.Parameter(torch.tensor(float(weight)))
        return self

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """Patch grids (n, h, w, d) whitened per position, where the scorer has Gaussians."""
        if self.whitener is None:
            return x
        assert self.center is not None
        return whiten(x, self.center, self.whitener)

    def reset(self, gen: torch.Generator) -> DiscriminatorScorer:
        """Adaptor to the identity (training starts from the frozen features as they are);
        the rest Xavier-normal, as in SimpleNet, drawn from ``gen``."""
        with torch.no_grad():
            self.adaptor.weight.copy_(torch.eye(self.adaptor.in_features))
            self.adaptor.bias.zero_()
            for layer in (self.hidden, self.out, self.position):
                if layer is None:
                    continue
                std = float(np.sqrt(2.0 / (layer.in_features + layer.out_features)))
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
                if layer.bias is not None:
                    layer.bias.zero_()
        return self

    def _position_term(self) -> torch.Tensor | None:
        if self.position is not None:
            assert self.encoding is not None
            return self.position(self.encoding)
        return self.positional_bias

    def discriminate(self, z: torch.Tensor) -> torch.Tensor:
        """Adapted patch grids (n, h, w, d) -> anomaly logits (n, h, w)."""
        n, h, w, d = z.shape
        pre = self.hidden(z.reshape(n, h * w, d))  # (n, P, hidden)
        pos = self._position_term()
        if pos is not None:
            pre = pre + pos
        logits = self.out(F.leaky_relu(pre, LEAKY_SLOPE)).reshape(n, h, w)
        if self.quad is not None:  # the squared length, centred and scaled as a chi-square's with d degrees
            logits = logits + self.quad * (((z * z).sum(-1) - d) / float(np.sqrt(2 * d)))
        return logits

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.discriminate(self.adaptor(self.whiten(emb.permute(0, 2, 3, 1))))

    def folded(self) -> DiscriminatorScorer:
        """The inference copy: frozen, with the positional term as a per-position bias (h * w, hidden)."""
        dim, hidden = self.adaptor.in_features, self.hidden.out_features
        fold = DiscriminatorScorer(dim, hidden, self.shape, self.frequencies, trainable=False)
        with torch.no_grad():
            fold.adaptor.load_state_dict(self.adaptor.state_dict())
            fold.out.load_state_dict(self.out.state_dict())
            fold.hidden.load_state_dict(self.hidden.state_dict())
            pos = self._position_term()
            fold.positional_bias = pos.detach().clone().contiguous() if pos is not None else None
            if self.quad is not None:
                assert self.center is not None and self.whitener is not None
                fold.use_gaussian(self.center.clone(), self.whitener.clone(), float(self.quad))
        return fold.eval().requires_grad_(False)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self.state_dict().items()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], shape: tuple[int, int]) -> DiscriminatorScorer:
        """The folded scorer saved by :meth:`arrays`."""
        hidden, dim = np.asarray(arrays["hidden.weight"]).shape
        scorer = cls(dim, hidden, shape, trainable=False)
        weights = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()}
        positional_bias = weights.pop("positional_bias", None)
        gaussian = [weights.pop(k, None) for k in ("center", "whitener", "quad")]
        scorer.load_state_dict(weights)
        scorer.positional_bias = positional_bias
        if gaussian[0] is not None:
            center, whitener, quad = gaussian
            assert whitener is not None and quad is not None
            scorer.use_gaussian(center, whitener, float(quad))
        return scorer.eval().requires_grad_(False)


def fourier_positions(shape: tuple[int, int], frequencies: int) -> torch.Tensor:
    """(h * w, 4 * frequencies): sin and cos of pi k u for k = 1..frequencies, u in [-1, 1]
    the patch centre's coordinate along each axis."""
    h, w = shape
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
    k = torch.arange(1, frequencies + 1, dtype=torch.float32) * np.pi
    fy = torch.cat([torch.sin(ys[:, None] * k), torch.cos(ys[:, None] * k)], dim=1)  # (h, 2f)
    fx = torch.cat([torch.sin(xs[:, None] * k), torch.cos(xs[:, None] * k)], dim=1)  # (w, 2f)
    return torch.cat([fy[:, None, :].expand(h, w, -1), fx[None, :, :].expand(h, w, -1)], dim=2).reshape(h * w, -1)


# -- the detector --------------------------------------------------------------------------------
@register_detector
class SimpleNet(FeatureDetector):
    """Discriminative detector on frozen features: learns from good images and synthetic anomalies.

    Parameters
    ----------
    backbone, weights, image_size, features, smoothing_sigma, verbose : as for PatchCore.
    embed_dim : patch embedding size after the PCA projection (fitted as PatchCore's, on the
        patches of 16 training images). All training patches are cached once (float16), so the
        cache and each training step grow linearly with it. 64, as PatchCore's: 128 scored the
        same on bottle (image AUROC 0.992 against 0.991) at half the training speed.
    hidden : width of the discriminator's hidden layer: twice embed_dim (SimpleNet's is two
        thirds of its much wider features).
    noise_std : standard deviation of the negatives' Gaussian noise, in units of the median
        channel's spread on the training patches. PCA channels' spreads fall a hundredfold from
        the first to the last, so the spread of all channels together is the first few channels'
        and meant a noise 3x larger on bottle than on Magnetic Tile; the median channel's is a
        unit that means the same on both. 2 beat 1 on both (bottle image AUROC 0.993 against
        0.989, Magnetic Tile 0.77 against 0.74).
    noise_range : each negative image's noise level is drawn log-uniformly between noise_std /
        noise_range and noise_std * noise_range. Near noise teaches the boundary of what is good,
        far noise what lies well outside it: with levels within 2x of noise_std, defects on the
        generated discs (which move patches further than any noise did) scored *below* good
        parts; within 4x, bottle rose from 0.993 / 0.946 (image / pixel AUROC) to 1.000 / 0.965.
    gaussian : also model each grid position as PaDiM does, and let the discriminator build on it:
        every position's embeddings are whitened by a Gaussian fitted to the training patches there
        (mean, Ledoit-Wolf-shrunk covariance), and the squared length of the whitened embedding
        (that Gaussian's own anomaly score) enters the logit with a learned weight. Against
        Gaussian-noise negatives that length is the sufficient statistic, which the two-layer
        discriminator alone learns only in part. Measured by ``defectlens benchmark
        ../shared/datasets --detectors simplenet`` with and without it (image AUROC): Magnetic
        Tile 0.776 -> 0.962 (whitening without the term: 0.91), AITEX 0.652 -> 0.773, DeepPCB
        0.567 -> 0.616, bottle 0.994 -> 0.994 (pixel AUROC 0.965 -> 0.970). It costs a (d x d)
        matrix per position in the model (16 MiB at 256 px and 64 dimensions). A model saved
        before it existed loads without it and scores as before.
    pooling : share of each position's covariance replaced by the mean covariance over positions
        (with ``gaussian``), or "auto": chosen per fit from POOLING_GRID by synthetic defects made
        from good images (``defectlens.detectors.position_gaussians`` says why and how; the choice
        is ``pooling_``, each share's synthetic recall ``pooling_recall_``). On a small set a
        position's covariance has directions in which no training image varied; unpooled, good
        images the fit never saw score far out there, and the k-fold threshold sits on them.
    positional : number of Fourier frequencies of the patch's grid coordinates the discriminator
        sees (0: none, as in the papers, which score every position alike). Aligned parts look
        different in different places (an edge is good at the border, a crack in the middle).
    shift_share : share of negative images whose blobs hold good patches from elsewhere in the
        grid instead of noise: what is wrong only by where it is. With positions seen it lifted
        bottle from image AUROC 0.916 to 0.989 (pixel 0.76 to 0.91), Magnetic Tile from 0.70 to
        0.74. On parts that look alike everywhere such negatives cannot be told from good patches
        and only shift every score alike.
    max_epochs : passes over the cached training features at most.
    patience : epochs without a better held-out AUROC before training stops (the held-out
        defects are recorded in ``validation_``: "synthetic defects" or "feature noise").
    max_train_seconds : training (after embedding) stops before an epoch would overrun this. 90 s
        keeps a fit on 200 images at 256 px within 2 minutes on a 2-core CPU. A fit that stops on
        time is not reproducible to the bit (how far it got depends on the machine's speed); one
        that stops early, or at max_epochs, is.
    validation_fraction : share of the training images held out for early stopping (seeded; none
        with fewer than 5 images, which are then validated on themselves). They are not trained
        on: with 200 images the discriminator learns from 170.
    lr : Adam learning rate of adaptor and discriminator (features are divided by their overall
        spread while training, so one rate suits every backbone and part).
    train_batch : images per training step (all their patches, and their noised copies'). An
        epoch is one pass over the training images but at least 32 steps.
    batch_size : images per backbone forward pass.
    random_state : seeds the held-out split, the initial weights, the noise and the masks.
    """

    name = "simplenet"
    aggregation = 3  # PatchCore's 3x3 local neighbourhood, as both papers use

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        weights: str | None = None,
        image_size: ModelSize = 256,
        features: str = "expanded",
        embed_dim: int = 64,
        hidden: int = 128,
        noise_std: float = 2.0,
        noise_range: float = 4.0,
        gaussian: bool = True,
        pooling: float | str = "auto",
        positional: int = 4,
        shift_share: float = 0.5,
        max_epochs: int = 40,
        patience: int = 5,
        max_train_seconds: float = 90.0,
        validation_fraction: float = 0.15,
        lr: float = 1e-3,
        train_batch: int = 8,
        batch_size: int = 8,
        smoothing_sigma: float = 4.0,
        random_state: int = 0,
        verbose: bool = False,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.features = features
        self.embed_dim = embed_dim
        self.hidden = hidden
        self.noise_std = noise_std
        self.noise_range = noise_range
        self.gaussian = gaussian
        self.pooling = pooling
        self.positional = positional
        self.shift_share = shift_share
        self.max_epochs = max_epochs
        self.patience = patience
        self.max_train_seconds = max_train_seconds
        self.validation_fraction = validation_fraction
        self.lr = lr
        self.train_batch = train_batch
        self.batch_size = batch_size
        self.smoothing_sigma = smoothing_sigma
        self.random_state = random_state
        self.verbose = verbose

    def _validate_params(self) -> None:
        super()._validate_params()
        for key in ("embed_dim", "hidden", "max_epochs", "train_batch"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
                raise DefectLensError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.patience < 1:
            raise DefectLensError(f"patience must be at least 1, got {self.patience}")
        if not self.noise_std > 0:
            raise DefectLensError(f"noise_std must be positive, got {self.noise_std}")
        if not self.noise_range >= 1:
            raise DefectLensError(f"noise_range must be at least 1, got {self.noise_range}")
        if not (isinstance(self.positional, int) and self.positional >= 0):
            raise DefectLensError(f"positional must be a non-negative integer, got {self.positional!r}")
        if self._fixed_pooling() is None and self.pooling != "auto":
            raise DefectLensError(f"pooling must be 'auto' or a share in [0, 1], got {self.pooling!r}")
        if not 0 <= self.shift_share <= 1:
            raise DefectLensError(f"shift_share must be in [0, 1], got {self.shift_share}")
        if not self.lr > 0:
            raise DefectLensError(f"lr must be positive, got {self.lr}")
        if not self.max_train_seconds > 0:
            raise DefectLensError(f"max_train_seconds must be positive, got {self.max_train_seconds}")
        if not 0 <= self.validation_fraction < 1:
            raise DefectLensError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")

    def chosen_params(self) -> dict[str, Any]:
        self._require_fitted()
        return {"pooling": self.pooling_} if self._fixed_pooling() is None else {}

    def _fixed_pooling(self) -> float | None:
        """The pooling share as given (a number, or its text from the command line); None for 'auto' or nonsense."""
        try:
            share = float(self.pooling)
        except (TypeError, ValueError):
            return None
        return share if 0 <= share <= 1 else None

    # -- fitting -------------------------------------------------------------------------------
    def fit(self, images: Sequence[ImageInput], labels: Sequence[int] | None = None) -> SimpleNet:
        good_images_only(self, labels)
        images = self._begin_fit(images)
        self._fit_projection(images)
        features = self._embed_all(images)
        self._train(features, images)
        self.n_train_images_ = len(images)
        return self

    def _fit_projection(self, images: list[ImageInput]) -> None:
        """Principal axes of the patches of up to 16 images spread over the set (as PatchCore)."""
        self._set_projection(*self._principal_axes(self._projection_sample(images), self.embed_dim))

    def _embed_all(self, images: list[ImageInput]) -> torch.Tensor:
        """Every training image's projected patch embeddings, (n, h, w, d) float16."""
        cache: torch.Tensor | None = None
        for batch, emb in self._iter_embeddings(images):
            if cache is None:
                _, d, h, w = emb.shape
                self.feature_shape_ = (h, w)
                cache = torch.empty((len(images), h, w, d), dtype=torch.float16)
            cache[batch.indices] = torch.from_numpy(emb.transpose(0, 2, 3, 1)).to(torch.float16)
        assert cache is not None
        return cache

    def _split(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.randperm(n, generator=gen)
        n_val = int(round(n * self.validation_fraction)) if n >= 5 else 0
        if n_val == 0:
            return order, order  # too few to hold out: validate on the training images
        return order[n_val:], order[:n_val]

    def _levels(self, n: int, gen: torch.Generator, centre: float) -> torch.Tensor:
        """Per-image noise standard deviations, log-uniform within noise_range of ``centre``."""
        spread = float(np.log(self.noise_range))
        return centre * torch.exp((torch.rand(n, generator=gen) * 2 - 1) * spread)

    def _validation_set(self, features: torch.Tensor, unit: float, gen: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
        """Held-out good images, and the same images with noise blobs in their raw features, at
        the lower half of the training noise (so the AUROC does not saturate at once)."""
        n, h, w, d = features.shape
        good = features.float()
        masks = perlin_masks(n, h, w, gen, full_share=0.0)
        levels = self._levels(n, gen, self.noise_std * unit / np.sqrt(self.noise_range))
        noisy = good + torch.randn(good.shape, generator=gen) * (masks * levels[:, None, None])[..., None]
        return torch.cat([good, noisy]), np.r_[np.zeros(n), np.ones(n)]

    def _negatives(self, z: torch.Tensor, masks: torch.Tensor, unit: float, gen: torch.Generator) -> torch.Tensor:
        """Noised copies of adapted patch grids z (b, h, w, d), changed only inside ``masks``.

        Noise: Gaussian, per image at a level log-uniform within noise_range of noise_std. A
        ``shift_share`` of the images has its blobs filled with good patches from elsewhere
        instead: another image's, displaced by a quarter to three quarters of the grid, so a
        position-aware discriminator learns what belongs where (a no-op on patterns that repeat
        everywhere, which it then cannot tell apart and scores alike). Dense operations only:
        the backward pass of scattered indexing is slow on CPU."""
        b, h, w, d = z.shape
        levels = self._levels(b, gen, self.noise_std * unit)
        fake = z + torch.randn(z.shape, generator=gen) * levels[:, None, None, None]
        if self.shift_share > 0 and self.positional > 0:
            shifted = (torch.rand(b, generator=gen) < self.shift_share)[:, None, None, None]
            dy = int(torch.randint(h // 4, max(h // 4 + 1, 3 * h // 4), (1,), generator=gen))
            dx = int(torch.randint(w // 4, max(w // 4 + 1, 3 * w // 4), (1,), generator=gen))
            fake = torch.where(shifted, torch.roll(z, shifts=(1, dy, dx), dims=(0, 1, 2)), fake)
        return torch.where(masks.bool()[..., None], fake, z)

    def _synthetic_features(self, images: list[ImageInput], ids: torch.Tensor | np.ndarray, count: int, seed: int) -> torch.Tensor | None:
        """Patch embeddings (count, h, w, d) of image-space synthetic defects made from the given
        images (``defectlens.data.defects``, where installed): stand-ins for real defects, which
        choose the epoch and the pooling better than noise like the training's own."""
        try:
            from defectlens.data.defects import synthesize
        except ImportError:
            return None
        held = [images[int(i)] for i in ids]
        pixels = np.concatenate([b.pixels for b in iter_batches(held, self.image_size, self.batch_size)])
        defects = synthesize(list(pixels.transpose(0, 2, 3, 1)), count, seed=seed)
        stack = np.stack([d.image for d in defects]).transpose(0, 3, 1, 2).astype(np.float32)
        with torch.inference_mode():
            emb = [self._embed(torch.from_numpy(stack[i : i + self.batch_size])) for i in range(0, len(stack), self.batch_size)]
        return torch.cat(emb).permute(0, 2, 3, 1).contiguous()

    def _choose_pooling(self, features: torch.Tensor, images: list[ImageInput] | None) -> PoolingChoice:
        fixed = self._fixed_pooling()
        if fixed is not None:
            return PoolingChoice(fixed, "as given")

        def defects(ids: np.ndarray, count: int, seed: int) -> torch.Tensor | None:
            return self._synthetic_features(images, ids, count, seed) if images is not None else None
        choice = choose_pooling(features, defects, seed=self.random_state)
        if self.verbose:
            print(f"simplenet: position covariances pooled {choice.pooling:.0%}: {choice.reason}")
        return choice

    def _train(self, features: torch.Tensor, images: list[ImageInput] | None = None) -> None:
        torch.manual_seed(self.random_state)
        gen = torch.Generator().manual_seed(self.random_state)
        train_ids, val_ids = self._split(len(features), gen)
        n, h, w, d = len(train_ids), *features.shape[1:]
        choice = self._choose_pooling(features, images) if self.gaussian else PoolingChoice(0.0, "no Gaussians to pool")
        self.pooling_, self.pooling_recall_ = choice.pooling, choice.recall
        gaussian = position_gaussians(features[train_ids], choice.pooling) if self.gaussian else None
        if gaussian is not None:  # the whole training runs on whitened embeddings, as the scorer will see them
            features = torch.cat([whiten(features[i : i + 64].float(), *gaussian) for i in range(0, len(features), 64)]).half()
        std = features[train_ids].reshape(-1, d)[:: max(1, (n * h * w) // 200_000)].float().std(dim=0)
        # the unit of noise: the median channel's spread (PCA channels' spreads fall steeply;
        # the median sits where a defect's change and the good variation are alike)
        self.noise_unit_ = float(std.median())
        # training sees features divided by their overall spread, so that one learning rate
        # suits every backbone and part; the division is folded into the adaptor afterwards
        self.input_scale_ = float(std.pow(2).mean().sqrt())
        train = (features[train_ids].float() / self.input_scale_).half()
        unit = self.noise_unit_ / self.input_scale_
        held_out = images is not None and len(val_ids) < len(features)
        defects = self._synthetic_features(images, val_ids, len(val_ids), self.random_state) if held_out else None
        if defects is not None and gaussian is not None:
            defects = whiten(defects, *gaussian)
        if defects is not None:
            val_x = torch.cat([features[val_ids].float(), defects]) / self.input_scale_
            val_y = np.r_[np.zeros(len(val_ids)), np.ones(len(defects))]
            self.validation_ = "synthetic defects"
        else:
            val_x, val_y = self._validation_set(features[val_ids].float() / self.input_scale_, unit, gen)
            self.validation_ = "feature noise"

        net = DiscriminatorScorer(d, self.hidden, (h, w), self.positional).reset(gen)
        if gaussian is not None:
            net.use_gaussian(*gaussian)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        history: dict[str, list[float]] = {"loss": [], "val_auroc": []}
        best, best_state, best_epoch, stale = -1.0, None, 0, 0
        start = time.perf_counter()
        bar = tqdm(total=self.max_epochs, desc="training", unit="epoch", disable=not self.verbose, leave=False)
        for epoch in range(self.max_epochs):
            net.train()
            # an epoch is a pass over the training images, and at least MIN_STEPS steps: a few
            # images would otherwise make an epoch a step or two, and early stopping meaningless
            passes = -(-MIN_STEPS * self.train_batch // n)
            perm = torch.cat([torch.randperm(n, generator=gen) for _ in range(passes)]) if passes > 1 else torch.randperm(n, generator=gen)
            total, steps = 0.0, 0
            for i in range(0, max(n, MIN_STEPS * self.train_batch), self.train_batch):
                x = train[perm[i : i + self.train_batch]].float()
                z = net.adaptor(x)
                masks = perlin_masks(len(x), h, w, gen)
                logits = net.discriminate(torch.cat([z, self._negatives(z, masks, unit, gen)]))
                good, bad = logits[: len(x)], logits[len(x) :][masks.bool()]
                loss = F.relu(TRUNCATION + good).mean() + F.relu(TRUNCATION - bad).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            auroc = self._validate(net, val_x, val_y)
            history["loss"].append(total / max(steps, 1))
            history["val_auroc"].append(auroc)
            bar.update(1)
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", auroc=f"{auroc:.4f}")
            if auroc >= best:  # on a tie the later epoch, trained longer, is kept...
                stale = 0 if auroc > best else stale + 1  # ...but only a gain resets the patience
                best, best_epoch = auroc, epoch
                best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
            else:
                stale += 1
            elapsed = time.perf_counter() - start
            # stop before an epoch that would overrun the budget, not after it
            if stale >= self.patience or elapsed * (epoch + 2) / (epoch + 1) > self.max_train_seconds:
                break
        bar.close()
        assert best_state is not None
        net.load_state_dict(best_state)
        with torch.no_grad():  # take raw embeddings: adaptor(x / scale) = (W / scale) x + b
            net.adaptor.weight.div_(self.input_scale_)
        self.scorer_ = net.folded()
        self.history_ = {k: np.asarray(v, dtype=np.float64) for k, v in history.items()}
        self.best_epoch_ = best_epoch
        self.train_seconds_ = time.perf_counter() - start

    @staticmethod
    def _validate(net: DiscriminatorScorer, x: torch.Tensor, y: np.ndarray) -> float:
        """Image AUROC (largest patch logit) of held-out good images against their noised copies."""
        net.eval()
        with torch.no_grad():
            scores = torch.cat([net(x[i : i + 32].permute(0, 3, 1, 2)).flatten(1).max(dim=1).values for i in range(0, len(x), 32)])
        return float(roc_auc_score(y, scores.numpy()))

    # -- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _score_pixels(self, pixels: torch.Tensor, watch: Stopwatch | None = None) -> PixelScores:
        watch = watch or Stopwatch()
        emb = self._embed(pixels)
        watch.lap("backbone")
        patch = self.scorer_(emb)
        watch.lap("discriminator")
        scores = patch.flatten(1).max(dim=1).values.numpy()
        maps = self._map_head(patch).numpy()
        watch.lap("postprocess")
        return PixelScores(scores.astype(np.float32), maps, emb.numpy())

    # -- state ---------------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        self._require_fitted()
        return {
            "projection": self.projection_,
            "projection_bias": self.projection_bias_,
            **{f"scorer.{k}": v for k, v in self.scorer_.arrays().items()},
            "noise_unit": np.asarray([self.noise_unit_, self.input_scale_], dtype=np.float64),
            "feature_shape": np.asarray(self.feature_shape_, dtype=np.int64),
            "history_loss": self.history_["loss"],
            "history_val_auroc": self.history_["val_auroc"],
            "fit_info": np.asarray([self.n_train_images_, self.best_epoch_], dtype=np.int64),
            "train_seconds": np.asarray([self.train_seconds_], dtype=np.float64),
            "validation": np.frombuffer(self.validation_.encode(), dtype=np.uint8),
            "pooling": np.asarray([self.pooling_], dtype=np.float64),
            **self._backbone_state(),
        }

    def set_state(self, state: dict[str, np.ndarray]) -> SimpleNet:
        self._validate_params()
        self._restore_backbone(state)
        self._set_projection(state["projection"], state["projection_bias"])
        self.feature_shape_ = tuple(int(v) for v in state["feature_shape"])
        self.scorer_ = DiscriminatorScorer.from_arrays({k[len("scorer."):]: v for k, v in state.items() if k.startswith("scorer.")},
                                                       self.feature_shape_)
        if self.scorer_.adaptor.in_features != self.projection_.shape[1]:
            raise DefectLensError("saved SimpleNet state is inconsistent (projection and discriminator differ in size)")
        self.noise_unit_, self.input_scale_ = (float(v) for v in state["noise_unit"])
        self.feature_shape_ = tuple(int(v) for v in state["feature_shape"])
        self.history_ = {"loss": np.asarray(state["history_loss"]), "val_auroc": np.asarray(state["history_val_auroc"])}
        self.n_train_images_, self.best_epoch_ = (int(v) for v in state["fit_info"])
        self.train_seconds_ = float(state["train_seconds"][0])
        self.validation_ = bytes(np.asarray(state["validation"], dtype=np.uint8)).decode()
        self.gaussian = self.scorer_.whitener is not None  # a model saved before the setting existed has none
        self.pooling_ = float(state["pooling"][0]) if "pooling" in state else 0.0  # saved before pooling: none
        self.pooling_recall_ = {}
        return self


__all__ = ["DiscriminatorScorer", "SimpleNet", "perlin_masks", "perlin_noise"]
