"""What every detector on frozen pretrained patch embeddings shares: the backbone, its fast
inference copy, streaming embedding of image sets, and saving the backbone in the bundle."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from defectlens.backbones import FEATURE_KINDS, FeatureExtractor, create_backbone, get_spec
from defectlens.data.images import Batch, ImageInput, iter_batches, spread
from defectlens.detectors.anomaly_map import AnomalyMapHead
from defectlens.detectors.base import Detector, PixelScores, Stopwatch, check_size
from defectlens.detectors.features import PatchEmbedder
from defectlens.errors import DefectLensError

_BACKBONE_PREFIX = "backbone."
PCA_IMAGES = 16  # images whose patches fit a projection: 16 x 1,024 patches at 256 px, ample for a few hundred axes
PCA_PATCHES = 65_536  # and at most this many patches, so large images take fewer (200 MB of 768-dim rows)


class FeatureDetector(Detector):
    """Base for PatchCore, PaDiM and the like. Subclasses store ``backbone``, ``weights``,
    ``image_size``, ``smoothing_sigma``, ``batch_size`` and ``verbose`` as settings."""

    backbone: str
    weights: str | None
    smoothing_sigma: float
    features: str = "expanded"  # what the backbone taps return (backbones.FEATURE_KINDS)
    aggregation: int = 3  # local neighbourhood averaged into each patch embedding

    def _embed_dim(self) -> int | None:
        return None

    def _validate_params(self) -> None:
        """Settings every feature detector shares; subclasses extend it with their own."""
        get_spec(self.backbone)
        if self.features not in FEATURE_KINDS:
            raise DefectLensError(f"features must be one of {', '.join(FEATURE_KINDS)}, got {self.features!r}")
        check_size(self.image_size, 32, 4096)
        if self.batch_size < 1:
            raise DefectLensError(f"batch_size must be at least 1, got {self.batch_size}")

    def _begin_fit(self, images: Sequence[ImageInput]) -> list[ImageInput]:
        self._validate_params()
        images = list(images)
        if not images:
            raise DefectLensError("fit needs at least one good image, got none")
        self._setup_backbone()
        return images

    def _setup_backbone(self) -> None:
        extractor, digest = create_backbone(self.backbone, self.weights, kind=self.features)
        self.embedder_ = PatchEmbedder(extractor, self.aggregation, self._embed_dim())
        self.backbone_sha256_ = digest or ""
        self._prepare_inference()

    def _prepare_inference(self) -> None:
        self._fast_embedder = self.embedder_.for_inference()
        self._map_head = AnomalyMapHead(self.image_size, self.smoothing_sigma)

    # set by export.runtime to score in an ONNX graph of this very detector; None: PyTorch
    _graph_scorer: Callable[[torch.Tensor, Stopwatch | None], PixelScores] | None = None

    def score_pixels(self, pixels: torch.Tensor, watch: Stopwatch | None = None) -> PixelScores:
        if self._graph_scorer is not None:
            return self._graph_scorer(pixels, watch)
        return self._score_pixels(pixels, watch)

    @abstractmethod
    def _score_pixels(self, pixels: torch.Tensor, watch: Stopwatch | None = None) -> PixelScores:
        """score_pixels in PyTorch: what fit calibrates, and what every runtime is checked against."""

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._fast_embedder(pixels.contiguous(memory_format=torch.channels_last)).contiguous()

    def _iter_embeddings(self, images: Sequence[ImageInput], desc: str = "features") -> Iterator[tuple[Batch, np.ndarray]]:
        """(batch, embeddings (n, d, h, w)) for every batch, with a progress bar when verbose."""
        with tqdm(total=len(images), desc=desc, unit="img", disable=not self.verbose, leave=False) as bar, torch.inference_mode():
            for batch in iter_batches(images, self.image_size, self.batch_size):
                yield batch, self._embed(torch.from_numpy(batch.pixels)).numpy()
                bar.update(len(batch.indices))

    def _projection_sample(self, images: Sequence[ImageInput], n_images: int = PCA_IMAGES) -> np.ndarray:
        """Patch embeddings of all channels of up to ``n_images`` images spread over the whole set (a
        folder sorted by time would otherwise give one shift's), up to PCA_PATCHES patches."""
        rows: list[np.ndarray] = []
        for _, emb in self._iter_embeddings(spread(images, n_images), desc="projection"):
            rows.append(emb.transpose(0, 2, 3, 1).reshape(-1, emb.shape[1]))
            if sum(len(r) for r in rows) >= PCA_PATCHES:
                break
        return np.concatenate(rows)[:PCA_PATCHES]

    @staticmethod
    def _check_reduction(d: int, k: int) -> None:
        if k >= d:
            raise DefectLensError(f"embed_dim {k} must be below the backbone's {d} channels to reduce them")

    def _principal_axes(self, sample: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The (d, k) principal axes of the sampled patches, largest first, and the bias that centres them."""
        self._check_reduction(sample.shape[1], k)
        x = torch.from_numpy(sample).double()
        mean = x.mean(dim=0)
        # torch's eigh, not NumPy's: after torch has run, NumPy's BLAS threads and torch's contend
        # for the cores and a 768 x 768 eigh took 10-20 s instead of 0.1 s on a 2-core machine
        _, vectors = torch.linalg.eigh(torch.cov(x.T))
        matrix = vectors.flip(1)[:, :k]
        return matrix.numpy(), (-mean @ matrix).numpy()

    def _set_projection(self, matrix: np.ndarray, bias: np.ndarray) -> None:
        """Project every patch embedding from here on (fitted, or restored from a bundle)."""
        self.projection_ = np.asarray(matrix, dtype=np.float32)
        self.projection_bias_ = np.asarray(bias, dtype=np.float32)
        self.embedder_.set_projection(self.projection_, self.projection_bias_)
        self._prepare_inference()

    def _extractor(self) -> FeatureExtractor:
        return self.embedder_.extractor

    def _backbone_state(self) -> dict[str, np.ndarray]:
        state = {"backbone_sha256": np.frombuffer(self.backbone_sha256_.encode(), dtype=np.uint8)}
        for key, value in self._extractor().state_dict().items():
            state[_BACKBONE_PREFIX + key] = value.numpy()
        return state

    def _restore_backbone(self, state: dict[str, np.ndarray]) -> None:
        self.embedder_ = PatchEmbedder(self._load_extractor(state), self.aggregation, self._embed_dim())
        self._prepare_inference()

    def _load_extractor(self, state: dict[str, np.ndarray]) -> FeatureExtractor:
        extractor, _ = create_backbone(self.backbone, pretrained=False, kind=self.features)
        weights = {k[len(_BACKBONE_PREFIX) :]: torch.from_numpy(np.array(v)) for k, v in state.items() if k.startswith(_BACKBONE_PREFIX)}
        missing, unexpected = extractor.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise DefectLensError(f"saved backbone state does not fit '{self.backbone}' ({len(missing)} missing, {len(unexpected)} unexpected keys)")
        self.backbone_sha256_ = bytes(state["backbone_sha256"]).decode()
        return extractor

    _TRANSIENT = ("_fast_embedder", "_map_head", "_graph_scorer")

    def __getstate__(self) -> dict:
        # derived objects (fused copies, search indexes) are rebuilt, not pickled (e.g. for Ray workers)
        return {k: v for k, v in vars(self).items() if k not in self._TRANSIENT}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        if "embedder_" in state:
            self._prepare_inference()
