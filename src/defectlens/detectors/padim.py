"""PaDiM (Defard et al., ICPR 2021): a Gaussian per patch position, Mahalanobis distance maps.

Fit: at every position of the patch grid, the mean and covariance of the good images' patch
embeddings there, reduced to ``n_features`` channels. Score: each test patch's
Mahalanobis distance to its position's Gaussian. Suits aligned parts (a fixture holds the part
in the same place every time); PatchCore, position-free, suits textures and loose parts.

Memory and time stay bounded for any number of training images: mean and covariance are
accumulated as running sums (float64), so only one batch of embeddings is held at a time.
The covariance is shrunk towards a scaled identity with the Ledoit-Wolf coefficient, which
scikit-learn estimates per position from a bounded reservoir of images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from defectlens.data.images import ImageInput, ModelSize
from defectlens.detectors.base import PixelScores, Stopwatch, good_images_only
from defectlens.detectors.feature_based import FeatureDetector
from defectlens.detectors.position_gaussians import shrinkages
from defectlens.detectors.registry import register_detector
from defectlens.errors import DefectLensError

SHRINKAGE_SAMPLE = 256  # images kept (per position) to estimate the Ledoit-Wolf coefficient
OUTER_IMAGES = 64  # images whose outer products are summed in one batched product (84 MB at 256 px, 160 channels)


def _add_outer(outer: np.ndarray, pending: list[np.ndarray]) -> None:
    """outer += sum over images of x x^T per position, as one batched matrix product over the
    pending images (BLAS, ~25x faster than numpy's einsum loops); empties ``pending``."""
    if not pending:
        return
    xp = torch.from_numpy(np.concatenate(pending)).permute(1, 0, 2)  # (positions, n, d)
    outer += torch.bmm(xp.transpose(1, 2), xp).numpy()
    pending.clear()


class MahalanobisScorer(nn.Module):
    """Each position's Mahalanobis distance to its good Gaussian, as batched matrix products (no
    cdist): what PaDiM scores with in PyTorch, and what its ONNX graph holds.

    With ``learned_mean`` (the mean of good images confirmed on the line), a patch is as far as
    the nearer of the two centres under the fitted covariance: a second mode for the line's new
    look, which leaves the fitted Gaussian, and so every defect far from both, as it was."""

    def __init__(self, mean: np.ndarray, precision: np.ndarray, channels: np.ndarray, shape: tuple[int, int],
                 learned_mean: np.ndarray | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32)))
        self.register_buffer("precision", torch.from_numpy(np.ascontiguousarray(precision, dtype=np.float32)))
        self.register_buffer("channels", torch.from_numpy(np.asarray(channels, dtype=np.int64)))
        self.register_buffer("learned_mean", None if learned_mean is None else torch.from_numpy(np.ascontiguousarray(learned_mean, dtype=np.float32)))
        self.shape = shape

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = emb.index_select(1, self.channels)
        # (P, n, d) as a contiguous copy, the layout the product batched over positions wants (on
        # a permuted view an earlier product ran 2.5x slower)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(2, 0, 1).contiguous()
        dist = self._squared(x - self.mean.unsqueeze(1))
        if self.learned_mean is not None:
            dist = torch.minimum(dist, self._squared(x - self.learned_mean.unsqueeze(1)))
        return dist.clamp_min(0).sqrt().t().reshape(-1, *self.shape)

    def _squared(self, delta: torch.Tensor) -> torch.Tensor:
        """delta' P delta per position and image, (P, n, d) -> (P, n). One matrix product batched
        over positions, not an einsum: ONNX Runtime ran the einsum at 28 ms per image alone and 6.9
        in batches of 8, this at 6.2 and 1.4 (1024 positions, 160 channels; PyTorch alike)."""
        return (torch.matmul(delta, self.precision) * delta).sum(dim=-1)


@register_detector
class PaDiM(FeatureDetector):
    """Per-position Gaussian detector.

    Parameters
    ----------
    backbone, weights, image_size, features, smoothing_sigma, batch_size, verbose : as for PatchCore.
    n_features : channels modelled per position (the paper's d). Covariance memory and the
        bundle grow as positions x n_features^2 floats (160: 105 MB at 256 px).
    channel_selection : "pool" averages adjacent channels down to n_features (PatchCore's
        reduction: deterministic, keeps every channel's information); "random" keeps a random
        subset, as the paper does. On Magnetic Tile the random subset's AUROC swung from 0.908
        to 0.945 with the draw, pooling gave 0.948-0.949 for 100 channels and 0.952 for 160.
    random_state : seed of the random channel subset and of the shrinkage reservoir.
    """

    name = "padim"
    aggregation = 1  # PaDiM models each position as is; the Gaussian absorbs small shifts

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        weights: str | None = None,
        image_size: ModelSize = 256,
        features: str = "expanded",
        n_features: int = 160,
        channel_selection: str = "pool",
        smoothing_sigma: float = 4.0,
        batch_size: int = 8,
        random_state: int = 0,
        verbose: bool = False,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.features = features
        self.n_features = n_features
        self.channel_selection = channel_selection
        self.smoothing_sigma = smoothing_sigma
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.n_features < 1:
            raise DefectLensError(f"n_features must be at least 1, got {self.n_features}")
        if self.channel_selection not in ("pool", "random"):
            raise DefectLensError(f"channel_selection must be 'pool' or 'random', got {self.channel_selection!r}")

    def _embed_dim(self) -> int | None:
        return self.n_features if self.channel_selection == "pool" else None

    def fit(self, images: Sequence[ImageInput], labels: Sequence[int] | None = None) -> PaDiM:
        good_images_only(self, labels)
        images = self._begin_fit(images)
        rng = np.random.default_rng(self.random_state)
        reservoir_ids = set(rng.permutation(len(images))[:SHRINKAGE_SAMPLE].tolist())
        total = outer = None
        reservoir: list[np.ndarray] = []
        pending: list[np.ndarray] = []
        for batch, emb in self._iter_embeddings(images):
            if total is None:
                n_channels, h, w = emb.shape[1:]
                d = min(self.n_features, n_channels)
                pick = rng.choice(n_channels, d, replace=False) if self.channel_selection == "random" else np.arange(d)
                self.channels_ = np.sort(pick)
                self.feature_shape_ = (h, w)
                total = np.zeros((h * w, d))
                outer = np.zeros((h * w, d, d))
            x = self._select(emb)  # (n, positions, d)
            total += x.sum(axis=0)
            pending.append(x)
            if sum(len(p) for p in pending) >= OUTER_IMAGES:
                _add_outer(outer, pending)
            reservoir += [x[j].astype(np.float32) for j, i in enumerate(batch.indices) if i in reservoir_ids]
        assert total is not None and outer is not None
        _add_outer(outer, pending)
        n = len(images)
        mean = total / n
        cov = (outer - n * np.einsum("pd,pe->pde", mean, mean)) / max(n - 1, 1)
        self.mean_ = mean.astype(np.float32)
        # One BLAS thread: thousands of 160x160 inversions gain nothing from threads, and two BLAS
        # threads beside torch's on two busy cores made them 100x slower (34 s instead of 0.3 s for 128)
        with threadpool_limits(1, user_api="blas"):
            self.precision_ = self._shrunk_precision(cov, np.stack(reservoir)).astype(np.float32)
        self.n_train_images_ = n
        self.learned_mean_: np.ndarray | None = None  # the second centre partial_fit learns
        self.n_learned_ = 0
        return self

    @property
    def learns_incrementally(self) -> bool:
        return True

    def partial_fit(self, images: Sequence[ImageInput]) -> PaDiM:
        """Teach the fitted model more good images without a refit: their mean embedding per
        position becomes a second centre beside the fitted one, under the fitted covariance, and a
        patch scores by the nearer of the two (later calls pool into the same centre).

        Why not pool them into the fitted Gaussian: a few images among hundreds barely move its
        mean, and the covariance they widen hides defects too. Measured with `benchmark
        --line-loop --detector padim` on bottle (docs/line.md): the pooled update took the moved
        line's false rejects from 100 % to 13 % but its recall on moved defects from 100 % to 64 %."""
        self._require_fitted()
        images = list(images)
        if not images:
            raise DefectLensError("partial_fit needs at least one good image, got none")
        x = np.concatenate([self._select(emb) for _, emb in self._iter_embeddings(images)])  # (k, positions, d)
        n, k = self.n_learned_, len(x)
        total = x.sum(axis=0) if self.learned_mean_ is None else n * self.learned_mean_.astype(np.float64) + x.sum(axis=0)
        self.learned_mean_ = (total / (n + k)).astype(np.float32)
        self.n_learned_ = n + k
        self.n_train_images_ += k
        return self

    def _select(self, emb: np.ndarray) -> np.ndarray:
        x = emb[:, self.channels_]  # (n, d, h, w)
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1).astype(np.float64)

    def _shrunk_precision(self, cov: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """Ledoit-Wolf: (1 - a) S + a (tr S / d) I, with a estimated per position on ``sample``
        (n, P, d), a reservoir of the images. Also keeps the inverse defined when there are fewer
        images than channels."""
        d = cov.shape[-1]
        # with a single image there is no spread to estimate: shrink fully to the identity
        alphas = shrinkages(sample) if len(sample) > 1 else np.ones(cov.shape[0])
        self.shrinkage_ = alphas.astype(np.float32)
        scale = np.trace(cov, axis1=1, axis2=2) / d
        shrunk = cov * (1 - alphas)[:, None, None]  # the identity's share goes on the diagonal in place: no (P, d, d) eye
        diagonal = np.arange(d)
        shrunk[:, diagonal, diagonal] += (alphas * scale + 1e-6 * np.maximum(scale, 1e-12))[:, None]  # + a numerical floor
        # the shrunk covariance is positive definite, so Cholesky: batched, faster than NumPy's
        # inverse, and free of torch's batched LU, which fails ("Pivots given to lu_solve ...") on
        # 160-channel matrices once torch.set_num_threads has been called, as a model load does
        # before a later fit in the same process. Its result is column-major, and a precision that
        # is not C-ordered would be copied (41 MB at 256 px) every time a scorer is made
        factor = torch.linalg.cholesky(torch.from_numpy(shrunk))
        return np.ascontiguousarray(torch.cholesky_inverse(factor).numpy())

    @torch.inference_mode()
    def _score_pixels(self, pixels: torch.Tensor, watch: Stopwatch | None = None) -> PixelScores:
        watch = watch or Stopwatch()
        emb = self._embed(pixels)
        watch.lap("backbone")
        patch = self.scorer()(emb)
        watch.lap("search")
        scores = patch.reshape(len(patch), -1).max(dim=1).values.numpy()
        maps = self._map_head(patch).numpy()
        watch.lap("postprocess")
        return PixelScores(scores.astype(np.float32), maps, emb.numpy())

    def scorer(self) -> MahalanobisScorer:
        """The fitted Gaussians as a module (its buffers share the arrays' memory: no copy)."""
        self._require_fitted()
        return MahalanobisScorer(self.mean_, self.precision_, self.channels_, self.feature_shape_, self.learned_mean_)

    def get_state(self) -> dict[str, np.ndarray]:
        self._require_fitted()
        return {
            "mean": self.mean_,
            "precision": self.precision_,
            "channels": self.channels_.astype(np.int64),
            "shrinkage": self.shrinkage_,
            "feature_shape": np.asarray(self.feature_shape_, dtype=np.int64),
            "n_train": np.asarray([self.n_train_images_], dtype=np.int64),
            # only once it has learned: a model that never did saves (and checksums) as before
            **({} if self.learned_mean_ is None else {"learned_mean": self.learned_mean_,
                                                       "n_learned": np.asarray([self.n_learned_], dtype=np.int64)}),
            **self._backbone_state(),
        }

    def set_state(self, state: dict[str, np.ndarray]) -> PaDiM:
        self._validate_params()
        self._restore_backbone(state)
        self.mean_ = np.asarray(state["mean"], dtype=np.float32)
        self.precision_ = np.asarray(state["precision"], dtype=np.float32)
        self.channels_ = np.asarray(state["channels"], dtype=np.int64)
        self.shrinkage_ = np.asarray(state["shrinkage"], dtype=np.float32)
        self.feature_shape_ = tuple(int(v) for v in state["feature_shape"])
        self.n_train_images_ = int(state["n_train"][0])
        self.learned_mean_ = np.asarray(state["learned_mean"], dtype=np.float32) if "learned_mean" in state else None
        self.n_learned_ = int(state["n_learned"][0]) if "n_learned" in state else 0
        if self.learned_mean_ is not None and self.learned_mean_.shape != self.mean_.shape:
            raise DefectLensError("saved PaDiM state is inconsistent (the learned centre and the mean differ in size)")
        if self.precision_.shape != (self.mean_.shape[0], len(self.channels_), len(self.channels_)):
            raise DefectLensError("saved PaDiM state is inconsistent (mean, precision and channels differ in size)")
        return self


__all__ = ["PaDiM"]
