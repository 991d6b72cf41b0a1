"""Tiling for high-resolution images: small defects on large parts keep their pixels.

Resizing a 4K line-scan image or a 1250-px strip to 256 px shrinks a 3-px scratch to nothing.
``TiledDetector`` cuts every image into overlapping tiles at native resolution (or a chosen
scale), fits any registered detector on the tiles of the good images, scores each tile and
stitches the tile maps back with weights that fall off linearly towards each tile's border
inside the overlap, so neighbouring tiles blend and no seam appears.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from defectlens.data.images import DECODE_WORKERS, Batch, ImageInput, load_rgb, preview, read_image
from defectlens.detectors.base import BatchScores, Detector, PixelScores, Stopwatch, good_images_only
from defectlens.detectors.registry import create_detector, detector_class, register_detector
from defectlens.errors import DefectLensError, ImageError

_INNER_PREFIX = "inner."


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, length): regular steps, the last one flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def blend_weights(tile: int, overlap: int) -> np.ndarray:
    """Separable ramp: 1 inside, falling to near 0 at the border across the overlap."""
    i = np.arange(tile, dtype=np.float64)
    ramp = np.minimum(1.0, np.minimum(i + 0.5, tile - i - 0.5) / max(overlap, 1))
    return np.outer(ramp, ramp)


def stitch(tile_maps: np.ndarray, origins: Sequence[tuple[int, int]], height: int, width: int, overlap: int) -> np.ndarray:
    """Weighted average of tile maps (k, tile, tile) placed at their origins (y, x)."""
    tile = tile_maps.shape[-1]
    weights = blend_weights(tile, overlap)
    total = np.zeros((height, width))
    norm = np.zeros((height, width))
    for m, (y, x) in zip(tile_maps, origins, strict=True):
        h, w = min(tile, height - y), min(tile, width - x)
        total[y : y + h, x : x + w] += (m * weights)[:h, :w]
        norm[y : y + h, x : x + w] += weights[:h, :w]
    return (total / np.maximum(norm, 1e-12)).astype(np.float32)


class _TileView(Sequence):
    """The tiles of a list of images, as one lazy sequence: each image is decoded once per
    pass (a small cache serves its tiles), never all held in memory."""

    def __init__(self, images: Sequence[ImageInput], owner: TiledDetector) -> None:
        self.images = list(images)
        self.owner = owner
        self.index: list[tuple[int, int, int]] = []
        for i, img in enumerate(self.images):
            rgb = owner._prepare(img)
            self.index += [(i, y, x) for y, x in owner._origins(*rgb.shape[:2])]
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k):  # type: ignore[override]
        i, y, x = self.index[k]
        with self._lock:
            rgb = self._cache.get(i)
        if rgb is None:
            rgb = self.owner._prepare(self.images[i])
            with self._lock:
                self._cache[i] = rgb
                while len(self._cache) > 4:
                    self._cache.popitem(last=False)
        t = self.owner.tile_size
        return self.owner._pad(rgb)[y : y + t, x : x + t]


@register_detector
class TiledDetector(Detector):
    """Any detector, applied tile by tile at native resolution.

    Parameters
    ----------
    detector : the registered detector fitted on tiles (patchcore, padim, ...).
    detector_params : its settings (its ``image_size`` is set to ``tile_size``).
    tile_size : tile side in pixels of the (scaled) image; a multiple of 16.
    overlap : fraction of a tile shared with its neighbour; the blend ramp spans it.
    scale : resize factor applied before tiling (1.0 = native; 0.5 halves a 4K image first).
    map_size : side of the square map handed to evaluation and overlays (the stitched map is
        computed at full resolution, then resampled).
    """

    name = "tiled"

    def __init__(self, detector: str = "patchcore", detector_params: dict | None = None, tile_size: int = 256, overlap: float = 0.25,
                 scale: float = 1.0, map_size: int = 512, verbose: bool = False) -> None:
        self.detector = detector
        self.detector_params = detector_params
        self.tile_size = tile_size
        self.overlap = overlap
        self.scale = scale
        self.map_size = map_size
        self.verbose = verbose

    @property
    def image_size(self) -> int:  # what evaluation resizes masks to
        return self.map_size

    @property
    def batch_size(self) -> int:
        return 1

    def _validate_params(self) -> None:
        if self.detector == self.name or detector_class(self.detector) is TiledDetector:
            raise DefectLensError("a tiled detector cannot tile another tiled detector")
        if self.tile_size < 32 or self.tile_size % 16:
            raise DefectLensError(f"tile_size must be a multiple of 16 of at least 32, got {self.tile_size}")
        if not 0 <= self.overlap < 1:
            raise DefectLensError(f"overlap must be in [0, 1), got {self.overlap}")
        if not 0 < self.scale <= 4:
            raise DefectLensError(f"scale must be in (0, 4], got {self.scale}")

    def _inner(self) -> Detector:
        params = {**(self.detector_params or {}), "image_size": self.tile_size, "verbose": self.verbose}
        return create_detector(self.detector, **params)

    def _prepare(self, image: ImageInput) -> np.ndarray:
        return self._scaled(load_rgb(image))

    def _scaled(self, rgb: np.ndarray) -> np.ndarray:
        if self.scale != 1.0:
            h, w = rgb.shape[:2]
            t = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
            size = (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
            rgb = F.interpolate(t, size=size, mode="bilinear", antialias=self.scale < 1, align_corners=False)[0].numpy().transpose(1, 2, 0)
        return np.ascontiguousarray(rgb, dtype=np.float32)

    def _pad(self, rgb: np.ndarray) -> np.ndarray:
        """Images smaller than a tile are reflect-padded up to it."""
        h, w = rgb.shape[:2]
        t = self.tile_size
        if h >= t and w >= t:
            return rgb
        return np.pad(rgb, ((0, max(0, t - h)), (0, max(0, t - w)), (0, 0)), mode="reflect")

    def _stride(self) -> int:
        return max(1, int(round(self.tile_size * (1 - self.overlap))))

    def _origins(self, height: int, width: int) -> list[tuple[int, int]]:
        s, t = self._stride(), self.tile_size
        return [(y, x) for y in tile_starts(max(height, t), t, s) for x in tile_starts(max(width, t), t, s)]

    def fit(self, images: Sequence[ImageInput], labels: Sequence[int] | None = None) -> TiledDetector:
        good_images_only(self, labels)
        self._validate_params()
        images = list(images)
        if not images:
            raise DefectLensError("fit needs at least one good image, got none")
        tiles = _TileView(images, self)
        self.inner_ = self._inner().fit(tiles)
        self.n_train_images_ = len(images)
        self.n_train_tiles_ = len(tiles)
        return self

    @property
    def learns_incrementally(self) -> bool:
        return getattr(self, "inner_", None) is not None and self.inner_.learns_incrementally

    def partial_fit(self, images: Sequence[ImageInput]) -> TiledDetector:
        """The inner detector learns the new images' tiles, cut as fit cuts them."""
        self._require_fitted()
        images = list(images)
        tiles = _TileView(images, self)
        self.inner_.partial_fit(tiles)
        self.n_train_images_ += len(images)
        self.n_train_tiles_ += len(tiles)
        return self

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, watch: Stopwatch | None = None) -> PixelScores:
        """Tiles are scored by the inner detector; whole images go through score_batches."""
        watch = watch or Stopwatch()
        return self.inner_.score_pixels(pixels, watch)

    def score_batches(self, images: Sequence[ImageInput], skip_errors: bool = False, progress: bool = False,
                      preview_side: int = 0, batch_size: int | None = None, workers: int = DECODE_WORKERS) -> Iterator[BatchScores]:
        """One image at a time, its tiles in batches of the inner detector's size: an image's tiles
        already fill a batch, so ``batch_size`` and ``workers`` (for whole images) do not apply."""
        self._require_fitted()
        from tqdm.auto import tqdm

        inner_batch = max(1, getattr(self.inner_, "batch_size", 4))
        t = self.tile_size
        for i, image in enumerate(tqdm(images, desc="scoring", unit="img", disable=not progress, leave=False)):
            watch = Stopwatch()
            try:
                original, digest = read_image(image)
                rgb = self._scaled(original)
            except ImageError as exc:
                if not skip_errors:
                    raise
                yield BatchScores(Batch([], np.zeros((0, 3, t, t), np.float32), [], [(i, exc)]), np.zeros(0, np.float32),
                                  np.zeros((0, self.map_size, self.map_size), np.float32))
                continue
            height, width = rgb.shape[:2]
            padded = self._pad(rgb)
            origins = self._origins(height, width)
            watch.lap("decode")
            tile_scores, tile_maps = [], []
            with torch.inference_mode():
                for start in range(0, len(origins), inner_batch):
                    chunk = origins[start : start + inner_batch]
                    pixels = np.stack([padded[y : y + t, x : x + t].transpose(2, 0, 1) for y, x in chunk])
                    s, m, _ = self.inner_.score_pixels(torch.from_numpy(np.ascontiguousarray(pixels)), watch)
                    tile_scores.append(s)
                    tile_maps.append(m)
            full = stitch(np.concatenate(tile_maps), origins, max(height, t), max(width, t), t - self._stride())[:height, :width]
            small = F.interpolate(torch.from_numpy(full)[None, None], size=(self.map_size, self.map_size), mode="area")[0]
            watch.lap("stitch")
            h0, w0 = (round(height / self.scale), round(width / self.scale))
            batch = Batch([i], np.zeros((1, 0), np.float32), [(h0, w0)], [], [digest], [preview(original, preview_side) if preview_side else None])
            yield BatchScores(batch,
                              np.array([np.concatenate(tile_scores).max()], np.float32), small.numpy(), None, dict(watch.ms))

    def chosen_params(self) -> dict[str, Any]:
        self._require_fitted()
        return self._inner_choices(self.inner_)

    def get_state(self) -> dict[str, np.ndarray]:
        self._require_fitted()
        state = {_INNER_PREFIX + k: v for k, v in self.inner_.get_state().items()}
        state["n_train"] = np.asarray([self.n_train_images_, self.n_train_tiles_], dtype=np.int64)
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> TiledDetector:
        self._validate_params()
        self.inner_ = self._inner().set_state({k[len(_INNER_PREFIX) :]: v for k, v in state.items() if k.startswith(_INNER_PREFIX)})
        self.n_train_images_, self.n_train_tiles_ = (int(v) for v in state["n_train"])
        return self


__all__ = ["TiledDetector", "blend_weights", "stitch", "tile_starts"]
