"""A generated demo data set in MVTec layout, so the demo runs on a machine with no data.

Parts are machined discs (concentric tool marks, sensor noise, small placement jitter);
defects are scratches (thin dark lines) and contamination spots (brownish blobs), each with
an exact pixel mask. Deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEFECT_TYPES = ("scratch", "spot")


def _part(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx = size / 2 + rng.uniform(-3, 3)
    cy = size / 2 + rng.uniform(-3, 3)
    radius = size * 0.36
    r = np.hypot(xx - cx, yy - cy)
    rings = 0.04 * np.sin(r * 0.9 + rng.uniform(0, 2 * np.pi))
    disc = (r < radius).astype(np.float32)
    edge = np.clip((radius - r) / 2.0, 0, 1)  # soft anti-aliased rim
    base = 0.18 + 0.05 * (1 - r / (size * 0.75))  # dark table with vignette
    metal = 0.62 + rings - 0.12 * (r / radius) ** 2
    grey = base * (1 - edge) + metal * edge * disc + base * (1 - disc) * edge
    rgb = np.stack([grey * 0.98, grey, grey * 1.03], axis=2)
    rgb += rng.normal(0, 0.012, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 1), (cx, cy, radius)


def _defect(rng: np.random.Generator, rgb: np.ndarray, kind: str, geom: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    size = rgb.shape[0]
    cx, cy, radius = geom
    mask_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_img)
    angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, radius * 0.6)
    px, py = cx + dist * np.cos(angle), cy + dist * np.sin(angle)
    if kind == "scratch":
        theta, length = rng.uniform(0, np.pi), rng.uniform(0.25, 0.45) * radius
        dx, dy = length * np.cos(theta), length * np.sin(theta)
        draw.line((px - dx, py - dy, px + dx, py + dy), fill=255, width=int(rng.integers(2, 4)))
        colour = np.array([-0.3, -0.3, -0.28])
    else:
        rx, ry = rng.uniform(5, 11), rng.uniform(5, 11)
        draw.ellipse((px - rx, py - ry, px + rx, py + ry), fill=255)
        colour = np.array([0.05, -0.12, -0.25])  # brown contamination
    mask = np.asarray(mask_img) > 0
    out = rgb.copy()
    out[mask] = np.clip(out[mask] + colour, 0, 1)
    return out, mask


def _save(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)


def make_synthetic_dataset(root: str | Path, n_train: int = 100, n_test_good: int = 12, n_test_defect: int = 10, size: int = 256, seed: int = 0) -> Path:
    """Write a demo category 'discs' under ``root`` (MVTec layout) and return its folder."""
    root = Path(root) / "discs"
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        _save(root / "train" / "good" / f"{i:03d}.png", _part(rng, size)[0])
    for i in range(n_test_good):
        _save(root / "test" / "good" / f"{i:03d}.png", _part(rng, size)[0])
    for kind in DEFECT_TYPES:
        for i in range(n_test_defect):
            rgb, geom = _part(rng, size)
            rgb, mask = _defect(rng, rgb, kind, geom)
            _save(root / "test" / kind / f"{i:03d}.png", rgb)
            mask_path = root / "ground_truth" / kind / f"{i:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    return root
