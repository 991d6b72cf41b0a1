"""PatchCore (Roth et al., CVPR 2022): nearest-neighbour distance to a coreset of good patches.

Fit: embed every patch of every good image, keep a greedy coreset as the memory bank.
Score: each test patch's distance to its nearest memory-bank patch is its anomaly score;
the image score is the largest patch score (optionally reweighted as in the paper, eq. 7).
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from defectlens.data.images import ImageInput, ModelSize
from defectlens.detectors.base import PixelScores, Stopwatch, good_images_only
from defectlens.detectors.coreset import extend_coreset, greedy_coreset
from defectlens.detectors.feature_based import PCA_IMAGES, FeatureDetector
from defectlens.detectors.registry import register_detector
from defectlens.errors import DefectLensError

SEARCHES = ("flat", "ivf")
RADIUS_SAMPLE = 65_536  # training patches whose distance to the bank sets the coverage radius
REDUCTIONS = ("mean", "pca", "random")
BANK_DTYPES = ("float32", "float16")


class NearestNeighbourScorer(nn.Module):
    """Distance of each patch to its nearest memory-bank patch, by matrix products (no cdist):
    the form of PatchCore's search that an ONNX graph can hold.

    The winner is chosen on |m|^2 - 2 q.m (|q|^2 is the same for every candidate) and its distance
    measured again as |q - m|, exactly as score_pixels measures faiss's winner, so the two agree to
    float rounding. The comparison is one matrix product, [q, 1] times the bank stored as
    [-2 m; |m|^2]: subtracting over the (patches, bank) matrix afterwards, or a Gemm adding |m|^2,
    took 3.7 and 4.6 ms per 256 px image in ONNX Runtime where this takes 3.0. PyTorch scoring
    keeps faiss: its approximate and half-precision indexes serve large memory banks.
    """

    def __init__(self, bank: np.ndarray) -> None:
        super().__init__()
        rows = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
        # the bank is held once: its rows come back as -0.5 times the first d rows (exact in floats)
        self.register_buffer("candidates", torch.cat([-2.0 * rows.t(), rows.pow(2).sum(dim=1, keepdim=True).t()]).contiguous())

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        n, d, h, w = emb.shape
        q = emb.permute(0, 2, 3, 1).reshape(-1, d)
        nearest = torch.cat([q, torch.ones_like(q[:, :1])], dim=1).matmul(self.candidates).argmin(dim=1)
        winners = self.candidates[:d].index_select(1, nearest).t() * -0.5
        return (q - winners).pow(2).sum(dim=1).sqrt().reshape(n, h, w)


@register_detector
class PatchCore(FeatureDetector):
    """Memory-bank detector; the default, and the most accurate with few good images.

    Parameters
    ----------
    backbone : registered backbone name.
    weights : optional local weights file for the backbone (otherwise the installed package's).
    image_size : the model input: a side (a square) or (height, width), on the command line
        WIDTHxHEIGHT (256x640 for a tall part), so that tall or wide parts keep their proportions.
    features : what the backbone taps give: ``expanded``, the tap blocks' widest (expanded)
        activations (768 channels on MobileNetV2), or ``blocks``, the block outputs before them
        (32 + 96 = 128 channels, what anomalib's PatchCore embeds). Neither wins on every part,
        so ``fit --detector auto`` tries both.
    embed_dim : patch embedding size; None keeps all backbone channels (768 for MobileNetV2).
        Search time, fit memory and the memory bank are linear in it.
    reduction : how channels are reduced to embed_dim: ``pca`` projects on the principal axes
        of the patches of 16 training images spread over the set; ``mean`` averages adjacent
        channels (the paper's PatchCore); ``random`` uses a seeded Gaussian projection. PCA to
        64 dimensions is the default because it was measured best (docs/measurements.md): on Magnetic Tile it
        raised image AUROC from 0.776 to 0.790 and cut search time 3x against means to 256,
        and on MVTec bottle it kept image AUROC 1.000.
    coreset_ratio : fraction of training patches kept. 1 % keeps inference fast on CPU and
        loses little accuracy (the paper's PatchCore-1 %); raise it for highly varied parts.
    coreset_global_max : most patches the coreset is chosen from in one global greedy pass,
        whose work grows with the square of the patch count. Above it, each image first keeps
        10x the ratio of its own patches, then one pass chooses among those: a tenth of the
        work (docs/measurements.md, scaling). None: always one pass.
    projection_dim : dimensions of the random projection used only to select the coreset.
    num_neighbors : neighbourhood size for the paper's reweighting.
    reweight : apply the paper's image-score reweighting (eq. 7); off = plain max.
    smoothing_sigma : Gaussian sigma in pixels for the anomaly map (at image_size).
    bank_dtype : ``float16`` halves the memory bank (and the model file's share of it); the
        neighbour is searched among the half-precision rows and its distance measured from them.
    search : nearest-neighbour index: ``flat`` (exact, the default) or ``ivf`` (inverted lists,
        probing an eighth of them: for large memory banks, i.e. large images or many training
        images). It only chooses the neighbour; the distance is always measured exactly. HNSW was
        tried and dropped: at 512 px on bottle (efSearch 64) it cut image AUROC from 0.998 to 0.70,
        because it missed ~1 % of neighbours and one miss inflates a good image's maximum patch score.
    batch_size : images per forward pass; small batches stay in CPU cache and run faster.
    random_state : seed for the coreset's start point and projection.
    verbose : show progress bars.
    """

    name = "patchcore"

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        weights: str | None = None,
        image_size: ModelSize = 256,
        features: str = "expanded",
        embed_dim: int | None = 64,
        reduction: str = "pca",
        bank_dtype: str = "float32",
        coreset_ratio: float = 0.01,
        coreset_global_max: int | None = 250_000,
        projection_dim: int = 64,
        num_neighbors: int = 9,
        reweight: bool = False,
        smoothing_sigma: float = 4.0,
        search: str = "flat",
        batch_size: int = 2,
        random_state: int = 0,
        verbose: bool = False,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.features = features
        self.embed_dim = embed_dim
        self.reduction = reduction
        self.bank_dtype = bank_dtype
        self.coreset_ratio = coreset_ratio
        self.coreset_global_max = coreset_global_max
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.reweight = reweight
        self.smoothing_sigma = smoothing_sigma
        self.search = search
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose

    def _validate_params(self) -> None:
        super()._validate_params()
        if not 0 < self.coreset_ratio <= 1:
            raise DefectLensError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.coreset_global_max is not None and self.coreset_global_max < 1:
            raise DefectLensError(f"coreset_global_max must be positive or None, got {self.coreset_global_max}")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise DefectLensError(f"embed_dim must be positive or None, got {self.embed_dim}")
        if self.reduction not in REDUCTIONS:
            raise DefectLensError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")
        if self.bank_dtype not in BANK_DTYPES:
            raise DefectLensError(f"bank_dtype must be one of {', '.join(BANK_DTYPES)}, got {self.bank_dtype!r}")
        if self.search not in SEARCHES:
            raise DefectLensError(f"search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if self.num_neighbors < 1:
            raise DefectLensError(f"num_neighbors must be at least 1, got {self.num_neighbors}")

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, images: Sequence[ImageInput], labels: Sequence[int] | None = None) -> PatchCore:
        good_images_only(self, labels)
        images = self._begin_fit(images)
        if self._projects():
            self._fit_projection(images)
        return self.fit_bank(images)

    def fit_bank(self, images: Sequence[ImageInput]) -> PatchCore:
        """(Re)build the memory bank from ``images`` through the embedder in place, the projection
        kept: `fit`'s last step, and what an int8 embedder needs, since a bank of float32 patches
        reads its quantisation noise as anomaly everywhere (export.quantize)."""
        images = list(images)
        features = self._embed_all(images)
        n_select = max(1, int(round(len(features) * self.coreset_ratio)))
        with tqdm(total=n_select, desc="coreset", unit="patch", disable=not self.verbose, leave=False) as bar:
            keep = greedy_coreset(features, n_select, self.projection_dim, self.random_state, bar.update,
                                  group_size=self.feature_shape_[0] * self.feature_shape_[1], global_max=self.coreset_global_max)
        self.memory_bank_ = np.ascontiguousarray(features[keep], dtype=self.bank_dtype)
        self.n_train_images_ = len(images)
        self.n_train_patches_ = len(features)
        self._build_index()
        self.coverage_radius_ = self._coverage_radius(features)
        self.n_learned_patches_ = 0
        return self

    def _coverage_radius(self, features: np.ndarray) -> float:
        """How far the farthest training patch lies from the memory bank: the radius the coreset
        covers the good images with, and what a patch learned later must exceed to be added."""
        rng = np.random.default_rng(self.random_state)
        sample = features if len(features) <= RADIUS_SAMPLE else features[rng.choice(len(features), RADIUS_SAMPLE, replace=False)]
        nearest = self._nearest(np.ascontiguousarray(sample, dtype=np.float32))
        return float(np.linalg.norm(sample - nearest, axis=1).max())

    def _nearest(self, queries: np.ndarray) -> np.ndarray:
        _, idx = self._search(queries, 1)
        return np.asarray(self.memory_bank_[idx[:, 0]], dtype=np.float32)

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's k nearest bank patches, with its misses answered exactly: an IVF index
        returns -1 where the lists it probed hold fewer than k patches, and -1 would silently
        pick the bank's last patch."""
        dist, idx = self._index.search(queries, k)
        missed = (idx < 0).any(axis=1)
        if missed.any():
            exact = faiss.IndexFlatL2(self.memory_bank_.shape[1])
            exact.add(np.asarray(self.memory_bank_, dtype=np.float32))
            dist[missed], idx[missed] = exact.search(np.ascontiguousarray(queries[missed]), k)
        return dist, idx

    @property
    def learns_incrementally(self) -> bool:
        return True

    def partial_fit(self, images: Sequence[ImageInput]) -> PatchCore:
        """Teach the fitted model more good images without a refit: their patches that the memory
        bank does not already cover (farther than ``coverage_radius_``) are added, greedily, as a
        coreset step over bank + new would add them. Projection and coverage radius stay as fitted,
        so learning an image like the fitted ones changes nothing."""
        self._require_fitted()
        images = list(images)
        if not images:
            raise DefectLensError("partial_fit needs at least one good image, got none")
        shape = self.feature_shape_
        new = self._embed_all(images)
        self.feature_shape_ = shape  # the grid is the fitted one (images are resized to image_size)
        d2 = np.square(np.linalg.norm(new - self._nearest(new), axis=1))
        added = extend_coreset(d2, new, self.coverage_radius_)
        if len(added):
            self.memory_bank_ = np.ascontiguousarray(np.concatenate([np.asarray(self.memory_bank_, np.float32), new[added]]), dtype=self.bank_dtype)
            self._build_index()
        self.n_train_images_ += len(images)
        self.n_train_patches_ += len(new)
        self.n_learned_patches_ += len(added)
        return self

    def _embed_dim(self) -> int | None:
        return self.embed_dim if self.reduction == "mean" else None

    def _projects(self) -> bool:
        return self.reduction != "mean" and self.embed_dim is not None

    def _fit_projection(self, images: list[ImageInput]) -> None:
        """Learn the (d, k) projection from all channels to embed_dim before the bank is embedded;
        a random projection only needs the channel count, so one image."""
        sample = self._projection_sample(images, PCA_IMAGES if self.reduction == "pca" else 1)
        if self.reduction == "pca":
            self._set_projection(*self._principal_axes(sample, self.embed_dim))
            return
        d, k = sample.shape[1], self.embed_dim
        self._check_reduction(d, k)
        self._set_projection(np.random.default_rng(self.random_state).standard_normal((d, k)) / np.sqrt(k), np.zeros(k))

    def _embed_all(self, images: list[ImageInput]) -> np.ndarray:
        features: np.ndarray | None = None
        per_image = 0
        for batch, emb in self._iter_embeddings(images):
            if features is None:
                _, d, h, w = emb.shape
                per_image = h * w
                self.feature_shape_ = (h, w)
                features = np.empty((len(images) * per_image, d), dtype=np.float32)
            flat = emb.transpose(0, 2, 3, 1).reshape(-1, emb.shape[1])
            start = batch.indices[0] * per_image
            features[start : start + flat.shape[0]] = flat
        assert features is not None
        return features

    # -- scoring ---------------------------------------------------------------------------
    def _build_index(self) -> None:
        n, d = self.memory_bank_.shape
        bank = np.asarray(self.memory_bank_, dtype=np.float32)  # faiss takes float32 in; fp16 indexes keep half-precision codes
        half = self.bank_dtype == "float16"
        if self.search == "ivf":
            nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # faiss wants 39+ training points per list
            quantizer = faiss.IndexFlatL2(d)
            if half:
                index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
            else:
                index = faiss.IndexIVFFlat(quantizer, d, nlist)
            index.cp.seed = self.random_state
            index.train(bank)
            index.nprobe = min(nlist, max(4, nlist // 8))  # an eighth of the lists, and never fewer than 4
        elif half:
            index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
        else:
            index = faiss.IndexFlatL2(d)
        index.add(bank)
        self._index = index

    @torch.inference_mode()
    def _score_pixels(self, pixels: torch.Tensor, watch: Stopwatch | None = None) -> PixelScores:
        watch = watch or Stopwatch()
        emb = self._embed(pixels)
        watch.lap("backbone")
        n, d, h, w = emb.shape
        queries = np.ascontiguousarray(emb.permute(0, 2, 3, 1).reshape(-1, d).numpy())
        _, nn_idx = self._search(queries, 1)
        # The search finds the neighbour; its distance is measured again directly, because BLAS
        # search computes |q|^2 - 2q.m + |m|^2, whose rounding is large next to small distances.
        # Exact distances also make the ONNX graph (matrix products, then the same gather) agree.
        patch = np.linalg.norm(queries - self.memory_bank_[nn_idx[:, 0]], axis=1).reshape(n, h * w)
        watch.lap("search")
        best = patch.argmax(axis=1)
        scores = patch[np.arange(n), best].astype(np.float64)
        if self.reweight:
            scores *= self._reweight(queries.reshape(n, h * w, d)[np.arange(n), best], nn_idx[:, 0].reshape(n, -1)[np.arange(n), best])
        maps = self._map_head(torch.from_numpy(patch.reshape(n, h, w).astype(np.float32))).numpy()
        watch.lap("postprocess")
        return PixelScores(scores.astype(np.float32), maps, emb.numpy())

    def _reweight(self, worst_patches: np.ndarray, nearest: np.ndarray) -> np.ndarray:
        """Paper eq. 7: trust a high score less when its nearest good patch sits in a dense
        neighbourhood of the memory bank that the test patch is also close to."""
        k = min(self.num_neighbors, len(self.memory_bank_))
        _, support = self._search(self.memory_bank_[nearest].astype(np.float32), k)
        diffs = self.memory_bank_[support] - worst_patches[:, None, :]
        dists = np.linalg.norm(diffs.astype(np.float64), axis=2)
        softmax0 = 1.0 / np.exp(dists - dists[:, :1]).sum(axis=1)
        return 1.0 - softmax0

    # -- state -----------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        self._require_fitted()
        projection = {"projection": self.projection_, "projection_bias": self.projection_bias_} if self._projects() else {}
        return {
            **projection,
            "memory_bank": self.memory_bank_,
            "feature_shape": np.asarray(self.feature_shape_, dtype=np.int64),
            "n_train": np.asarray([self.n_train_images_, self.n_train_patches_], dtype=np.int64),
            "coverage": np.asarray([self.coverage_radius_, self.n_learned_patches_], dtype=np.float64),
            **self._backbone_state(),
        }

    def set_state(self, state: dict[str, np.ndarray]) -> PatchCore:
        self._validate_params()
        if self._projects() and "projection" not in state:
            # a model saved before `reduction` existed: channel means were then the only reduction
            self.reduction = "mean"
        self._restore_backbone(state)
        if self._projects():
            self._set_projection(state["projection"], state["projection_bias"])
        self.memory_bank_ = np.ascontiguousarray(state["memory_bank"], dtype=self.bank_dtype)
        self.feature_shape_ = tuple(int(v) for v in state["feature_shape"])
        self.n_train_images_, self.n_train_patches_ = (int(v) for v in state["n_train"])
        self._build_index()
        if "coverage" in state:
            self.coverage_radius_, learned = (float(v) for v in state["coverage"])
            self.n_learned_patches_ = int(learned)
        else:  # saved before models could learn on the line: the radius is measured from the bank itself
            self.coverage_radius_, self.n_learned_patches_ = self._bank_spacing(), 0
        return self

    def _bank_spacing(self) -> float:
        """For a bank saved without its coverage radius: the smallest distance between two bank
        patches. Greedy k-center adds a patch only while it lies farther than the final covering
        radius from every patch chosen before, so this bounds that radius from above."""
        bank = np.asarray(self.memory_bank_, dtype=np.float32)
        if len(bank) < 2:
            return 0.0
        dist, _ = self._search(bank, 2)
        spacing = np.sqrt(np.maximum(dist[:, 1], 0.0))
        return float(spacing[spacing > 0].min()) if (spacing > 0).any() else 0.0

    _TRANSIENT = (*FeatureDetector._TRANSIENT, "_index")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "memory_bank_" in state:
            self._build_index()


__all__ = ["PatchCore"]
