"""Reading images from disk into arrays the backbones can use, with one-line errors.

Every supported input (RGB, grayscale, palette, RGBA, 16-bit; PNG, JPEG, BMP, TIFF) becomes
float32 RGB in [0, 1]. EXIF orientation is honoured, because line cameras and phones both
write it and a rotated part looks defective to a model trained on upright ones.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from defectlens.errors import DefectLensError, ImageError, ImageFormatError, ImageTooLargeError

ImageInput = str | os.PathLike | np.ndarray | Image.Image
# A model's input size: one side (square), or (height, width) so that tall or wide parts are not
# squashed. Height first, as in array shapes; the CLI writes it WIDTHxHEIGHT, as image sizes are said.
ModelSize = int | tuple[int, int]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_PIXELS = 64_000_000  # 8000 x 8000: beyond any industrial camera we target; stops decompression bombs
PREVIEW_SIDE = 512  # overlays are drawn from a copy this large at most: readable, and cheap to colour and encode


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def describe(image: ImageInput) -> str:
    """A short name for an input, for messages and records."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, np.ndarray):
        return f"<array {image.shape} {image.dtype}>"
    return f"<PIL image {image.size} {image.mode}>"


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, or raise ImageError naming it."""
    path = Path(path)
    return _decode(io.BytesIO(read_file(path)), str(path), MAX_PIXELS)


def read_file(path: Path) -> bytes:
    """An image file's bytes, after the checks that need no decoding (exists, not empty, not huge)."""
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    size = path.stat().st_size
    if size == 0:
        raise ImageError(f"{path}: empty file")
    if size > MAX_FILE_BYTES:
        raise ImageTooLargeError(f"{path}: file is {size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES / 2**20:.0f} MiB limit")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def decode_bytes(data: bytes, name: str, max_pixels: int | None = None, formats: Iterable[str] | None = None) -> Image.Image:
    """Decode an upload, judging its format by content (an extension proves nothing).

    ``formats`` are PIL format names (``PNG``, ``JPEG``...); anything else is refused before its
    pixels are decoded, so a crafted file in an unexpected codec never reaches that codec.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    return _decode(io.BytesIO(data), name, MAX_PIXELS if max_pixels is None else max_pixels, formats)


def _decode(source: Path | io.BytesIO, name: str, max_pixels: int, formats: Iterable[str] | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            if formats is not None and img.format not in set(formats):
                raise ImageFormatError(f"{name}: {img.format} images are not accepted here (accepted: {', '.join(sorted(formats))})")
            if img.width * img.height > max_pixels:
                raise ImageTooLargeError(f"{name}: {img.width}x{img.height} pixels is over the {max_pixels:,} pixel limit")
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageFormatError(f"{name}: not an image, or a format we do not read (use PNG, JPEG, BMP or TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(f"{name}: image is too large (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None
    return img


def to_rgb_float(img: Image.Image) -> np.ndarray:
    """Any PIL image -> float32 (H, W, 3) in [0, 1]; 16-bit data keeps its full precision."""
    return read_image(img)[0]


EXIF_ORIENTATION = 0x0112


def _upright(img: Image.Image) -> Image.Image | np.ndarray:
    """The image turned as its EXIF says: 8-bit data as an RGB PIL image (so it can be resized
    in 8 bits, several times faster than in float), deeper data as float32 (H, W, 3) in [0, 1]."""
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # transposing copies even an upright image
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float32)
        # 16-bit sensors: scale by the container range, not per image, so brightness means
        # the same in every image (per-image stretching can hide a dark defect).
        arr = np.clip(arr / 65535.0, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        arr = np.clip(arr, 0.0, 1.0) if arr.max() <= 1.0 else np.clip(arr / 65535.0, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def array_to_rgb_float(arr: np.ndarray, name: str = "<array>") -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.size == 0:
        raise ImageError(f"{name}: expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {arr.shape}")
    arr = arr[..., :3] if arr.shape[2] == 4 else arr
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float32), 0.0, 1.0)
    raise ImageError(f"{name}: unsupported array dtype {arr.dtype}")


def load_rgb(image: ImageInput) -> np.ndarray:
    """Load any supported input as float32 RGB (H, W, 3) in [0, 1] at its own size."""
    return read_image(image)[0]


def read_image(image: ImageInput) -> tuple[np.ndarray, str | None]:
    """The image as float32 RGB, and the sha256 of the file's bytes (None for arrays and PIL
    images): one read serves the model, the history's fingerprint and the overlay."""
    source, digest = _open(image)
    return (source if isinstance(source, np.ndarray) else np.asarray(source, dtype=np.float32) / 255.0), digest


def _open(image: ImageInput) -> tuple[Image.Image | np.ndarray, str | None]:
    """The image upright (see ``_upright``), and the sha256 of the file's bytes."""
    if isinstance(image, np.ndarray):
        return array_to_rgb_float(image), None
    if isinstance(image, Image.Image):
        return _upright(image), None
    path = Path(image)
    data = read_file(path)
    return _upright(_decode(io.BytesIO(data), str(path), MAX_PIXELS)), hashlib.sha256(data).hexdigest()


T = TypeVar("T")


def spread(items: Sequence[T], n: int) -> list[T]:
    """Up to ``n`` items evenly spaced over the whole sequence, first and last included: a folder
    sorted by time would otherwise give one shift's images. (A fixed stride cut off the end: 30
    images and n = 16 gave the first 16.)"""
    items = list(items)
    if n >= len(items):
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def preview(rgb: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
    """uint8 copy with the longest side at most ``side``: what overlays are drawn on."""
    return _preview8(Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)), side)


def size_hw(size: ModelSize | list[int]) -> tuple[int, int]:
    """(height, width) of a model size; a bundle's JSON gives back a list where a tuple was saved."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size):
        return int(size[0]), int(size[1])
    raise DefectLensError(f"image size must be a side in pixels or (height, width), got {size!r}")


def normalise_size(size: ModelSize | list[int]) -> ModelSize:
    """A side for a square size, else a (height, width) tuple: the form settings are kept in."""
    h, w = size_hw(size)
    return h if h == w else (h, w)


def parse_size(text: str) -> ModelSize:
    """``256`` (square) or ``WIDTHxHEIGHT`` such as ``256x640`` (a tall part) -> a model size."""
    parts = text.lower().replace(" ", "").split("x")
    if not all(p.isdigit() for p in parts) or len(parts) not in (1, 2):
        raise DefectLensError(f"image size must be a side such as 256 or WIDTHxHEIGHT such as 256x640, got {text!r}")
    if len(parts) == 1:
        return int(parts[0])
    return normalise_size((int(parts[1]), int(parts[0])))


def format_size(size: ModelSize | list[int]) -> str:
    """A model size as the CLI writes it: ``256`` or ``WIDTHxHEIGHT``."""
    h, w = size_hw(size)
    return str(h) if h == w else f"{w}x{h}"


def resize_rgb(rgb: np.ndarray, size: ModelSize) -> np.ndarray:
    """Resize to the model size with antialiasing (PIL), per channel in float for 16-bit safety."""
    h, w = size_hw(size)
    if rgb.shape[0] == h and rgb.shape[1] == w:
        return rgb
    channels = [np.asarray(Image.fromarray(rgb[..., c], mode="F").resize((w, h), Image.BILINEAR)) for c in range(3)]
    return np.stack(channels, axis=2)


@dataclass
class Loaded:
    """One image as the model needs it, with what else was learned in the same read."""

    pixels: np.ndarray  # (3, height, width) float32 at the model size
    size: tuple[int, int]  # original (height, width)
    digest: str | None = None  # sha256 of the file's bytes
    preview: np.ndarray | None = None  # uint8 copy for overlays, when asked for


def load_for_model(image: ImageInput, size: ModelSize, preview_side: int = 0) -> Loaded:
    """Image resized for the model as CHW float32, its original size and digest, and with
    ``preview_side`` a small copy to draw overlays on.

    8-bit files are resized in 8 bits and only then made float: the same antialiased filter as
    the float path, within one grey level (a camera's own noise is larger), for 6 of the 14 ms
    that a 900 x 900 PNG took to load; on two cores that time is taken from the backbone.
    """
    source, digest = _open(image)
    if isinstance(source, np.ndarray):
        return Loaded(np.ascontiguousarray(resize_rgb(source, size).transpose(2, 0, 1)), (source.shape[0], source.shape[1]), digest,
                      preview(source, preview_side) if preview_side else None)
    h, w = size_hw(size)
    small = source if source.size == (w, h) else source.resize((w, h), Image.BILINEAR)
    pixels = np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return Loaded(np.ascontiguousarray(pixels), (source.height, source.width), digest, _preview8(source, preview_side) if preview_side else None)


def _preview8(img: Image.Image, side: int) -> np.ndarray:
    if max(img.size) > side:
        scale = side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return np.asarray(img)


@dataclass
class Batch:
    """Images decoded for the model, with what failed to load kept beside them."""

    indices: list[int]  # positions in the input sequence of the images in ``pixels``
    pixels: np.ndarray  # (n, 3, height, width) float32 in [0, 1]; n may be 0 if all failed
    sizes: list[tuple[int, int]]  # original (height, width) of each image
    errors: list[tuple[int, ImageError]] = field(default_factory=list)
    digests: list[str | None] = field(default_factory=list)  # sha256 of each file's bytes (None for arrays)
    previews: list[np.ndarray | None] = field(default_factory=list)  # uint8 copies for overlays, when asked for


DECODE_WORKERS = 2  # decoding threads unless this machine's tuning measured better (inference.tuning)


def iter_batches(
    images: Sequence[ImageInput], size: ModelSize, batch_size: int, workers: int = DECODE_WORKERS, skip_errors: bool = False, preview_side: int = 0
) -> Iterator[Batch]:
    """Decode ahead in threads and yield batches in input order.

    Pillow releases the GIL while decoding, so a small pool overlaps disk and decode with the
    backbone; only a few batches are in flight, so memory stays flat over millions of images.
    With ``skip_errors`` an unreadable image is reported in ``Batch.errors`` instead of raised.
    """
    ahead = max(2, 2 * batch_size)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()
        source = iter(enumerate(images))
        exhausted = False
        while True:
            while not exhausted and len(pending) < ahead + batch_size:
                try:
                    i, img = next(source)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((i, pool.submit(load_for_model, img, size, preview_side)))
            if not pending:
                return
            indices, loaded, errors = [], [], []
            while pending and len(indices) + len(errors) < batch_size:
                i, fut = pending.popleft()
                try:
                    loaded.append(fut.result())
                except ImageError as exc:
                    if not skip_errors:
                        raise
                    errors.append((i, exc))
                    continue
                indices.append(i)
            pixels = np.stack([x.pixels for x in loaded]) if loaded else np.zeros((0, 3, *size_hw(size)), np.float32)
            yield Batch(indices, pixels, [x.size for x in loaded], errors, [x.digest for x in loaded], [x.preview for x in loaded])


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def flatten_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand folders (recursively) into their image files; keep files as given."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_image_file(p))
            if not found:
                raise ImageError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif path.exists():
            out.append(path)
        else:
            raise ImageError(f"{path}: file not found")
    return out
