"""Synthetic defects made from good images, seeded and deterministic.

A detector trained on good parts only still has to be chosen and checked, and real defect images
are usually scarce or absent when a line starts. Like CutPaste, DRAEM and SWSA, we make stand-in
defects out of the good images themselves, in families that cover the ways parts really fail:
foreign material pasted in, foreign texture, scratches, spots, missing material and deformation.
Those are local: every one changes the look of the patches it covers. A seventh family, ``logical``,
is made for the defects that are not (MVTec LOCO's: a component missing, one too many, one moved,
one the wrong colour): a whole region of the part moved elsewhere in it, removed, or recoloured,
at 4-25 % of the image, where each patch may still look like a good one and only the whole is
wrong. ``fit --detector auto`` scores it apart from the others and uses it only to judge the
image-level global term (``detectors.global_term``), which local defects never reward: real
defects are mostly local, and a large share of component-sized ones in the ranking moved the pick
on AITEX fabric from the real best (tiled PaDiM, 0.878) to an untiled one (0.840).

Each defect comes with the mask of the pixels that really changed (a change below ``VISIBLE`` is
not a defect a person or a detector could see; pinholes inside are filled, as a person outlines a
defect), so a pixel metric never rewards or punishes a detector for a region that looks exactly
like the good part. Work is done in a window around the defect, so one defect costs a few
milliseconds at model resolution and fitting can afford dozens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from defectlens.data.images import load_rgb

FAMILIES: tuple[str, ...] = ("cutpaste", "texture", "scratch", "spot", "missing", "warp")  # local, 0.05-10 % of the image
LOGICAL = "logical"
ALL_FAMILIES: tuple[str, ...] = (*FAMILIES, LOGICAL)
LOGICAL_AREA = (0.04, 0.25)  # a component, not a blemish: a tenth of a part's area is typical

VISIBLE = 0.02  # smallest change (largest over channels) counted as part of a defect
MAX_TRIES = 6  # places tried before settling for the attempt closest to the asked area
AREA_SLACK = 2.0  # an attempt within this factor of the asked area is taken at once
UNIFORM_SHARE = 0.15  # share of defect centres drawn uniformly instead of on busy (textured) places

Window = tuple[slice, slice]


@dataclass
class SyntheticDefect:
    """A good image turned defective, with the exact pixels that changed (a stand-in ground-truth mask)."""

    image: np.ndarray  # float32 (H, W, 3) in [0, 1]
    mask: np.ndarray  # bool (H, W), True where the image was changed meaningfully
    family: str
    area: float  # mask.mean()


def perlin(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise in about [-1, 1] with ``res`` lattice cells along each axis.

    Vectorised over the whole array and valid for any shape (no need for a multiple of ``res``),
    because defect windows have arbitrary sizes.
    """
    h, w = shape
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1)).astype(np.float32)
    gy, gx = np.sin(angles), np.cos(angles)
    ty = np.arange(h, dtype=np.float32) * (ry / h)
    tx = np.arange(w, dtype=np.float32) * (rx / w)
    iy, ix = ty.astype(int), tx.astype(int)
    fy, fx = (ty - iy)[:, None], (tx - ix)[None, :]
    iy, ix = iy[:, None], ix[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        return gy[iy + dy, ix + dx] * (fy - dy) + gx[iy + dy, ix + dx] * (fx - dx)

    u, v = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return (top * (1 - u) + bottom * u) * np.float32(math.sqrt(2))


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def _fractal(shape: tuple[int, int], cells: float, rng: np.random.Generator, octaves: int = 3) -> np.ndarray:
    """Octaves of Perlin noise, ``cells`` lattice cells along the longer side: irregular at every scale, like real stains and wear."""
    h, w = shape
    longest = max(h, w)
    total = np.zeros(shape, np.float32)
    amp, norm = 1.0, 0.0
    for k in range(octaves):
        c = cells * 2**k
        if c > longest / 2:
            break
        total += amp * perlin(shape, (max(1, round(c * h / longest)), max(1, round(c * w / longest))), rng)
        norm += amp
        amp *= 0.5
    return total / max(norm, 1.0)


def _blob(shape: tuple[int, int], n_px: float, rng: np.random.Generator, roughness: float, cells: float) -> np.ndarray:
    """A bool shape of about ``n_px`` pixels: an ellipse filling the window, roughened by noise.

    Thresholding at a rank rather than a level gives the asked pixel count exactly, whatever the
    noise; more roughness breaks the shape into several pieces, like spatter or DRAEM's masks.
    """
    h, w = shape
    y = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    score = np.float32(roughness) * _fractal(shape, cells, rng) - (y * y + x * x)
    n = int(np.clip(round(n_px), 1, h * w))
    flat = score.ravel()
    threshold = np.partition(flat, flat.size - n)[flat.size - n]
    return score >= threshold


def _dims(n_px: float, aspect: float, shape: tuple[int, int], fill: float) -> tuple[float, float]:
    """Height and width of a window of ``n_px / fill`` pixels with width/height ``aspect``, fitted into the image."""
    H, W = shape
    total = min(n_px / fill, H * W)
    h = math.sqrt(total / aspect)
    w = total / h
    if h > H:
        h, w = H, total / H
    if w > W:
        w, h = W, min(H, total / W)
    return h, w


def _window(shape: tuple[int, int], cy: float, cx: float, h: float, w: float) -> Window:
    """A window about (cy, cx), moved rather than cut at the image border so the defect keeps its size."""
    H, W = shape
    h, w = int(np.clip(round(h), 1, H)), int(np.clip(round(w), 1, W))
    y0 = int(np.clip(round(cy - h / 2), 0, H - h))
    x0 = int(np.clip(round(cx - w / 2), 0, W - w))
    return slice(y0, y0 + h), slice(x0, x0 + w)


def _offsets(win: Window) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets from the window's centre, (h, 1) and (1, w), for shapes drawn in the window."""
    ys, xs = win
    dy = np.arange(ys.stop - ys.start, dtype=np.float32) - (ys.stop - ys.start - 1) / 2
    dx = np.arange(xs.stop - xs.start, dtype=np.float32) - (xs.stop - xs.start - 1) / 2
    return dy[:, None], dx[None, :]


def _sample(src: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``src`` (H, W, C) at float coordinates, mirrored past its border."""
    y, x = np.broadcast_arrays(y, x)
    return np.stack([ndimage.map_coordinates(src[..., c], [y, x], order=1, mode="mirror") for c in range(src.shape[2])], axis=-1)


def _affine_source(donor: np.ndarray, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, extent: float, scale: float) -> np.ndarray:
    """Donor pixels for local coordinates (u, v), from a random place, turned by a random angle and scaled.

    ``extent`` is the radius the coordinates reach, so the source stays inside the donor when it can.
    """
    Dh, Dw = donor.shape[:2]
    half = scale * extent
    scy = rng.uniform(min(half, Dh / 2), max(Dh - half, Dh / 2))
    scx = rng.uniform(min(half, Dw / 2), max(Dw - half, Dw / 2))
    phi = rng.uniform(0, 2 * np.pi)
    c, s = math.cos(phi) * scale, math.sin(phi) * scale
    if rng.random() < 0.5:  # a mirrored copy is as plausible as a turned one
        u = -u
    return _sample(donor, scy + s * u + c * v, scx + c * u - s * v)


def _jitter(patch: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and (colour only) channel gain and saturation, so a pasted copy is not an exact one."""
    mean = patch.mean()
    out = (patch - mean) * rng.uniform(1 - 0.4 * strength, 1 + 0.5 * strength) + mean + rng.uniform(-0.2, 0.2) * strength
    if patch.shape[2] == 3:
        out = out * rng.uniform(1 - 0.15 * strength, 1 + 0.15 * strength, 3).astype(np.float32)
        grey = out.mean(axis=2, keepdims=True)
        out = grey + (out - grey) * rng.uniform(1 - 0.5 * strength, 1 + 0.5 * strength)
    return out


def _rect_inside(win: Window, ph: float, pw: float, theta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance inside a ph x pw rectangle turned by theta at the window's centre (negative outside), and its local coordinates."""
    dy, dx = _offsets(win)
    c, s = math.cos(theta), math.sin(theta)
    u = c * dx + s * dy
    v = c * dy - s * dx
    return np.minimum(pw / 2 - np.abs(u), ph / 2 - np.abs(v)), u, v


def _rect_box(ph: float, pw: float, theta: float) -> tuple[float, float]:
    c, s = abs(math.cos(theta)), abs(math.sin(theta))
    return ph * c + pw * s + 2, pw * c + ph * s + 2


def _cutpaste(img: np.ndarray, donor: np.ndarray, rng: np.random.Generator, cy: float, cx: float, n_px: float) -> tuple[Window, np.ndarray]:
    """A turned, scaled, recoloured patch of a good image pasted elsewhere; a third are long thin scars."""
    H, W = img.shape[:2]
    if rng.random() < 0.3:
        length = min(n_px / rng.uniform(2, 6), 0.7 * max(H, W))
        ph, pw = max(n_px / length, 2.0), length
        theta = rng.uniform(0, np.pi) if H > 0.5 * W and W > 0.5 * H else rng.normal(0 if W > H else np.pi / 2, 0.15)
    else:
        aspect = math.exp(rng.uniform(-math.log(3), math.log(3)))
        ph = min(math.sqrt(n_px / aspect), 0.8 * H)
        pw = min(n_px / ph, 0.8 * W)
        theta = rng.uniform(-np.pi / 4, np.pi / 4)
    win = _window((H, W), cy, cx, *_rect_box(ph, pw, theta))
    inside, u, v = _rect_inside(win, ph, pw, theta)
    soft = rng.random() < 0.5  # as if the material were smeared in; else a hard edge, anti-aliased over one pixel
    alpha = np.clip(inside / rng.uniform(1.0, max(1.5, 0.25 * min(ph, pw))) if soft else inside + 0.5, 0, 1)[..., None]
    patch = _jitter(_affine_source(donor, rng, u, v, 0.5 * math.hypot(ph, pw), math.exp(rng.uniform(-0.3, 0.3))), rng, rng.uniform(0.3, 1.0))
    return win, img[win] * (1 - alpha) + patch * alpha


def _restyle(tex: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One or two strong appearance changes, so the donor's texture reads as foreign material (we have no texture library offline)."""
    ops = ["invert", "solarize", "posterize", "gamma", "stretch", "mosaic", "equalize"] + (["channels"] * 2 if tex.shape[2] == 3 else [])
    for op in rng.choice(ops, size=int(rng.integers(1, 3)), replace=False):
        if op == "invert":
            tex = 1 - tex
        elif op == "solarize":
            t = rng.uniform(0.3, 0.7)
            tex = np.where(tex > t, 1 - tex, tex)
        elif op == "posterize":
            levels = int(rng.integers(2, 5))
            tex = np.floor(tex * levels) / (levels - 1)
        elif op == "gamma":
            tex = np.clip(tex, 0, 1) ** math.exp(rng.uniform(-1.0, 1.0))
        elif op == "stretch":
            lo, hi = np.percentile(tex, (2, 98))
            tex = (tex - lo) / max(hi - lo, 0.05)
        elif op == "mosaic":
            tex = _mosaic(tex, int(rng.integers(3, 13)), rng)
        elif op == "equalize":
            order = np.argsort(tex.mean(axis=2), axis=None)
            ranks = np.empty(order.size, np.float32)
            ranks[order] = np.linspace(0, 1, order.size, dtype=np.float32)
            tex = tex - tex.mean(axis=2, keepdims=True) + ranks.reshape(tex.shape[:2])[..., None]
        else:
            tex = tex[..., rng.permutation(3)] * rng.uniform(0.7, 1.3, 3).astype(np.float32)
    return tex


def _mosaic(tex: np.ndarray, block: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks of the texture shuffled: keeps its grain and colours but none of its structure."""
    h, w, c = tex.shape
    hb, wb = -(-h // block), -(-w // block)
    padded = np.pad(tex, ((0, hb * block - h), (0, wb * block - w), (0, 0)), mode="symmetric")
    blocks = padded.reshape(hb, block, wb, block, c).transpose(0, 2, 1, 3, 4).reshape(hb * wb, block, block, c)
    blocks = blocks[rng.permutation(hb * wb)]
    return blocks.reshape(hb, wb, block, block, c).transpose(0, 2, 1, 3, 4).reshape(hb * block, wb * block, c)[:h, :w]


def _texture(img: np.ndarray, donor: np.ndarray, rng: np.random.Generator, cy: float, cx: float, n_px: float) -> tuple[Window, np.ndarray]:
    """DRAEM-style: foreign texture blended into an irregular Perlin-noise shape."""
    H, W = img.shape[:2]
    win = _window((H, W), cy, cx, *_dims(n_px, math.exp(rng.uniform(-0.7, 0.7)), (H, W), 0.35))
    shape = (win[0].stop - win[0].start, win[1].stop - win[1].start)
    mask = _blob(shape, n_px, rng, rng.uniform(0.8, 2.0), rng.uniform(1.5, 4))
    dy, dx = _offsets(win)
    tex = _restyle(_affine_source(donor, rng, dx, dy, 0.5 * math.hypot(*shape), math.exp(rng.uniform(-1.0, 1.0))), rng)
    alpha = mask.astype(np.float32)
    if rng.random() < 0.5:
        alpha = ndimage.gaussian_filter(alpha, rng.uniform(0.5, 1.5))
    alpha = (alpha * (1 - rng.uniform(0, 0.6)))[..., None]  # DRAEM keeps up to 80% of the original; we keep less so small ones stay visible
    return win, img[win] * (1 - alpha) + tex * alpha


def _scratch(img: np.ndarray, donor: np.ndarray, rng: np.random.Generator, cy: float, cx: float, n_px: float) -> tuple[Window, np.ndarray]:
    """Thin gently curved lines, 1-4 px wide; large areas become a bundle of scratches (a scuff), not a wide one."""
    H, W = img.shape[:2]
    width = rng.uniform(1.0, 4.0)
    total = n_px / (width + 0.7)  # the anti-aliased rim adds most of a pixel
    longest = 0.6 * max(H, W)
    n = math.ceil(total / longest)
    length = max(int(total / n), 3)
    heading = rng.uniform(0, np.pi) if H > 0.5 * W and W > 0.5 * H else rng.normal(0 if W > H else np.pi / 2, 0.2)
    spread = rng.uniform(2, 2 + 0.15 * min(H, W))
    t = np.linspace(-0.5, 0.5, length, dtype=np.float32)
    points = []
    for _ in range(n):
        bend = rng.normal(0, 0.5) * t + rng.normal(0, 0.6) * t * t  # total turn and its change along the line
        angle = heading + rng.normal(0, 0.15) + bend
        path = np.cumsum(np.stack([np.sin(angle), np.cos(angle)], axis=1), axis=0)
        offset = rng.normal(0, spread) * np.array([math.cos(heading), -math.sin(heading)]) + rng.normal(0, spread, 2)
        points.append(path - path.mean(axis=0) + (cy, cx) + offset * (n > 1))
    pts = np.rint(np.concatenate(points)).astype(int)
    pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < H) & (pts[:, 1] >= 0) & (pts[:, 1] < W)]
    if not len(pts):  # every line fell outside the image: nothing drawn, so this attempt is retried elsewhere
        win = _window((H, W), cy, cx, 1, 1)
        return win, img[win]
    margin = int(width) + 2
    y0, x0 = max(pts[:, 0].min() - margin, 0), max(pts[:, 1].min() - margin, 0)
    win = (slice(y0, min(pts[:, 0].max() + margin + 1, H)), slice(x0, min(pts[:, 1].max() + margin + 1, W)))
    seeds = np.ones((win[0].stop - y0, win[1].stop - x0), bool)
    seeds[pts[:, 0] - y0, pts[:, 1] - x0] = False
    alpha = np.clip(width / 2 + 0.5 - ndimage.distance_transform_edt(seeds).astype(np.float32), 0, 1)
    alpha *= np.clip(0.65 + 0.5 * _fractal(seeds.shape, max(seeds.shape) / 40, rng, octaves=2), 0.15, 1)  # depth varies along a scratch
    local = img[win]
    # Lighter over dark surroundings and darker over light ones, decided along the line, so a
    # scratch crossing a two-tone part (copper and board) shows on both.
    lighter = ndimage.gaussian_filter(local.mean(axis=2), 3.0)[..., None] < rng.uniform(0.35, 0.65)
    k = rng.uniform(0.3, 0.75)
    target = np.where(lighter, local + (1 - local) * k, local * (1 - k))
    return win, local + (target - local) * alpha[..., None]


def _spot(img: np.ndarray, donor: np.ndarray, rng: np.random.Generator, cy: float, cx: float, n_px: float) -> tuple[Window, np.ndarray]:
    """A stain, dot or patch of contamination: dark, light or (colour images) tinted, mottled, often with a soft edge."""
    H, W = img.shape[:2]
    spatter = rng.random() < 0.3
    fill = 0.12 if spatter else 0.5
    win = _window((H, W), cy, cx, *_dims(n_px, math.exp(rng.uniform(-0.5, 0.5)), (H, W), fill))
    shape = (win[0].stop - win[0].start, win[1].stop - win[1].start)
    alpha = _blob(shape, n_px, rng, 3.0 if spatter else rng.uniform(0.2, 1.0), 6 if spatter else 2).astype(np.float32)
    if rng.random() < 0.6:
        alpha = ndimage.gaussian_filter(alpha, rng.uniform(0.5, 2.5))
    alpha *= rng.uniform(0.5, 1.0) * (1 - rng.uniform(0, 0.5) * (_fractal(shape, 3, rng) + 1) / 2)
    local = img[win]
    kind = rng.choice(["dark", "light", "tint"] if img.shape[2] == 3 else ["dark", "light"])
    if kind == "dark" or (kind == "light" and local.mean() > 0.6):  # a light spot needs room to be lighter
        target = local * rng.uniform(0.1, 0.6)
    elif kind == "light":
        target = local + (1 - local) * rng.uniform(0.4, 0.9)
    else:
        target = (0.25 + 0.75 * local.mean(axis=2, keepdims=True)) * rng.uniform(0.1, 1.0, 3).astype(np.float32)
    return win, local + (target - local) * alpha[..., None]


def _missing(img: np.ndarray, donor: np.ndarray, rng: np.random.Generator, cy: float, cx: float, n_px: float) -> tuple[Window, np.ndarray]:
    """Material gone: a blob or a turned rectangle (a missing component or chip) filled from the surface around it."""
    H, W = img.shape[:2]
    aspect = math.exp(rng.uniform(-0.8, 0.8))
    h, w = _dims(n_px, aspect, (H, W), 0.65)
    margin = max(3.0, 0.4 * math.sqrt(n_px))
    if rng.random() < 0.5:
        theta = rng.uniform(-np.pi / 6, np.pi / 6)
        ph = min(math.sqrt(n_px / aspect), 0.8 * H)
        pw = min(n_px / ph, 0.8 * W)
        bh, bw = _rect_box(ph, pw, theta)
        win = _window((H, W), cy, cx, bh + 2 * margin, bw + 2 * margin)
        hole = _rect_inside(win, ph, pw, theta)[0] > 0
    else:
        win = _window((H, W), cy, cx, h + 2 * margin, w + 2 * margin)
        wh, ww = win[0].stop - win[0].start, win[1].stop - win[1].start
        ih, iw = max(int(wh - 2 * margin), 1), max(int(ww - 2 * margin), 1)
        hole = np.zeros((wh, ww), bool)
        t, left = (wh - ih) // 2, (ww - iw) // 2
        hole[t:t + ih, left:left + iw] = _blob((ih, iw), n_px, rng, rng.uniform(0.3, 1.0), 2)
    local = img[win]
    known = ~hole
    grey = local.mean(axis=2)
    ring = known & ndimage.binary_dilation(hole, iterations=2)
    if ring.any() and np.ptp(grey[ring]) > 0.2:
        # Fill from the commoner of the two tones around the hole: a piece missing from a trace
        # shows bare board, not a blend of board and copper.
        split = grey[ring].mean()
        dark = (grey[ring] < split).mean() >= 0.5
        known &= (grey < split) == dark
    filled = _pushpull(local, known.astype(np.float32))
    # Sensor grain, measured robustly so the edges of a two-tone part do not count as grain: the fill
    # then looks like bare surface rather than a smear.
    grain = 1.4826 * np.median(np.abs(grey - ndimage.gaussian_filter(grey, 1.0))[known]) if known.any() else 0.0
    filled = filled + rng.normal(0, grain, hole.shape).astype(np.float32)[..., None]
    return win, np.where(hole[..., None], filled, local)


def _pushpull(values: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Fill pixels of weight 0 from weighted ones, coarse to fine (push-pull): smooth, and linear in pixels unlike inpainting solvers."""
    h, w = weight.shape
    if weight.min() >= 1:
        return values
    if h < 2 or w < 2:
        total = weight.sum()
        mean = (values * weight[..., None]).sum(axis=(0, 1)) / total if total > 0 else values.mean(axis=(0, 1))
        return values * weight[..., None] + mean * (1 - weight[..., None])
    ph, pw = h % 2, w % 2
    v = np.pad(values * weight[..., None], ((0, ph), (0, pw), (0, 0)))
    wt = np.pad(weight, ((0, ph), (0, pw)))
    h2, w2 = (h + ph) // 2, (w + pw) // 2
    sw = wt.reshape(h2, 2, w2, 2).sum(axis=(1, 3))
    sv = v.reshape(h2, 2, w2, 2, -1).sum(axis=(1, 3))
    coarse = _pushpull(sv / np.maximum(sw, 1e-6)[..., None], np.minimum(sw, 1.0))
    up = _upsample2(_upsample2(coarse, 0), 1)[:h, :w]
    return values * weight[..., None] + up * (1 - weight[..., None])


def _upsample2(a: np.ndarray, axis: int) -> np.ndarray:
    """Twice the size along ``axis``, bilinear with pixel centres aligned (what push-pull needs), edges held."""
    a = np.moveaxis(a, axis, 0)
    padded = np.concatenate([a[:1], a, a[-1:]])
    even = 0.75 * a + 0.25 * padded[:-2]
    odd = 0.75 * a + 0.25 * padded[2:]
    return np.moveaxis(np.stack([even, odd], axis=1).reshape(2 * a.shape[0], *a.shape[1:]), 0, axis)


def _warp(img: np.ndarray, donor: np.ndarray, rng: np.random.Generator, cy: float, cx: float, n_px: float) -> tuple[Window, np.ndarray]:
    """A dent, bulge, twist or crumple: a smooth local displacement that fades to nothing at its rim."""
    H, W = img.shape[:2]
    aspect = math.exp(rng.uniform(-0.5, 0.5))
    r = math.sqrt(n_px / np.pi)
    ry, rx = min(r / math.sqrt(aspect), 0.45 * H), min(r * math.sqrt(aspect), 0.45 * W)
    amp = max(rng.uniform(0.2, 0.45) * min(ry, rx), 1.5)
    win = _window((H, W), cy, cx, 2 * ry + 2, 2 * rx + 2)
    dy, dx = _offsets(win)
    bump = np.clip(1 - (dy / ry) ** 2 - (dx / rx) ** 2, 0, 1) ** 2
    kind = rng.choice(["bulge", "pinch", "shift", "twirl", "crumple"])
    if kind in ("bulge", "pinch"):
        k = (amp / min(ry, rx)) * (1 if kind == "bulge" else -1)
        sy, sx = dy * (1 - k * bump), dx * (1 - k * bump)
    elif kind == "shift":
        a = rng.uniform(0, 2 * np.pi)
        sy, sx = dy - amp * bump * math.sin(a), dx - amp * bump * math.cos(a)
    elif kind == "twirl":
        a = rng.choice([-1, 1]) * rng.uniform(0.4, 1.2) * bump
        c, s = np.cos(a), np.sin(a)
        sy, sx = c * dy + s * dx, c * dx - s * dy
    else:
        shape = bump.shape
        sy = dy + amp * bump * _fractal(shape, 2.5, rng, octaves=2)
        sx = dx + amp * bump * _fractal(shape, 2.5, rng, octaves=2)
    centre_y, centre_x = (win[0].start + win[0].stop - 1) / 2, (win[1].start + win[1].stop - 1) / 2
    return win, _sample(img, sy + centre_y, sx + centre_x)


def _hue_turn(local: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colours turned about the grey axis (a red part made green), or for grey images a brightness
    change strong enough to see: the wrong colour of a component, or a tile fired unevenly."""
    if local.shape[2] == 1:
        k = rng.uniform(0.15, 0.35)
        return local * (1 - k) if rng.random() < 0.5 or local.mean() > 0.6 else local + (1 - local) * k
    a = rng.choice([-1, 1]) * rng.uniform(np.pi / 4, np.pi * 3 / 4)
    n = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -n[2], n[1]], [n[2], 0, -n[0]], [-n[1], n[0], 0]])
    turn = math.cos(a) * np.eye(3) + math.sin(a) * cross + (1 - math.cos(a)) * np.outer(n, n)  # Rodrigues
    grey = local.mean(axis=2, keepdims=True)
    chroma = local - grey
    if float(np.abs(chroma).mean()) < 0.04:  # a colourless part has no hue to turn: give it one
        chroma = chroma + rng.uniform(-0.15, 0.15, 3).astype(np.float32)
    return grey + (chroma @ turn.T.astype(np.float32))


def _logical(img: np.ndarray, donor: np.ndarray, rng: np.random.Generator, cy: float, cx: float, n_px: float) -> tuple[Window, np.ndarray]:
    """A large region of the part itself moved (an extra or misplaced component), removed, or recoloured.

    Moved content comes from the same image, never the donor, and is feathered in, so its patches
    are the part's own: only where it is, and what is no longer where it was, are wrong.
    """
    kind = rng.choice(["moved", "removed", "recoloured"])
    if kind == "removed":
        return _missing(img, donor, rng, cy, cx, n_px)
    H, W = img.shape[:2]
    aspect = math.exp(rng.uniform(-0.7, 0.7))
    ph = min(math.sqrt(n_px / aspect), 0.7 * H)
    pw = min(n_px / ph, 0.7 * W)
    win = _window((H, W), cy, cx, ph, pw)
    h, w = win[0].stop - win[0].start, win[1].stop - win[1].start
    dy, dx = _offsets(win)
    feather = max(1.5, 0.12 * min(h, w))
    edge = np.minimum((h - 1) / 2 - np.abs(dy), (w - 1) / 2 - np.abs(dx)) + 0.5
    alpha = np.clip(edge / feather, 0, 1)
    local = img[win]
    if kind == "moved":
        # The source is as far from the destination as the image allows, so the copy is not onto itself.
        far = [(y, x) for y, x in rng.uniform(0, 1, (8, 2)) * (H - h, W - w)]
        y0, x0 = max(far, key=lambda p: abs(p[0] - win[0].start) / max(h, 1) + abs(p[1] - win[1].start) / max(w, 1))
        source = img[int(y0):int(y0) + h, int(x0):int(x0) + w]
        if abs(y0 - win[0].start) < h / 2 and abs(x0 - win[1].start) < w / 2:  # no room to move it: it is turned over instead
            source = source[::-1, ::-1]
        # On a uniform texture a moved region is more of the same texture, which is no defect: only a
        # move that changes the picture at the region's own scale counts; else it is recoloured.
        sigma = (max(2.0, min(h, w) / 8), max(2.0, min(h, w) / 8), 0)
        coarse = np.abs(ndimage.gaussian_filter(source, sigma) - ndimage.gaussian_filter(local, sigma)).max(axis=2)
        if (coarse[alpha >= 1] >= 2 * VISIBLE).mean() >= 0.25:
            return win, local * (1 - alpha[..., None]) + source * alpha[..., None]
    blob = ndimage.gaussian_filter(_blob((h, w), 0.8 * h * w, rng, rng.uniform(0.3, 0.8), 2).astype(np.float32), feather / 2)
    alpha = (alpha * blob)[..., None]
    return win, local * (1 - alpha) + _hue_turn(local, rng) * alpha


_MAKERS: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator, float, float, float], tuple[Window, np.ndarray]]] = {
    "cutpaste": _cutpaste, "texture": _texture, "scratch": _scratch, "spot": _spot, "missing": _missing, "warp": _warp,
    LOGICAL: _logical}


def _centre_sampler(img: np.ndarray, rng: np.random.Generator) -> Callable[[], tuple[float, float]]:
    """Draws defect centres mostly where the image is busy (local contrast), so defects land on the part, not on a plain background.

    Measured on a coarse grid (about 64 cells on the long side) because it only steers placement.
    """
    H, W = img.shape[:2]
    s = max(1, min(max(H, W) // 64, min(H, W)))
    h, w = H // s, W // s
    grey = img[: h * s, : w * s].mean(axis=2).reshape(h, s, w, s).mean(axis=(1, 3))
    mean = ndimage.gaussian_filter(grey, 1.5)
    busy = ndimage.gaussian_filter(np.sqrt(np.maximum(ndimage.gaussian_filter(grey * grey, 1.5) - mean * mean, 0)), 1.0).ravel()
    # Capped, so the strongest edge (often the part's outline against the background) does not
    # draw every defect onto the outline: anything a quarter as busy is as likely.
    busy = np.minimum(busy, 0.25 * busy.max())
    p = np.full(busy.size, 1.0 / busy.size)
    if busy.sum() > 1e-9:
        p = (1 - UNIFORM_SHARE) * busy / busy.sum() + UNIFORM_SHARE * p
    cdf = np.cumsum(p, dtype=np.float64)

    def draw() -> tuple[float, float]:
        cell = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), cdf.size - 1)
        return (cell // w + rng.random()) * s, (cell % w + rng.random()) * s

    return draw


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with enclosed holes filled; by labelling, one pass, where scipy's fill_holes erodes until it converges."""
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    outside = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return mask | ((labels > 0) & ~np.isin(labels, outside))


def _as_image(image: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 4:
        raise ValueError(f"{name}: expected a float (H, W, 3) image of at least 4x4 pixels, got shape {arr.shape}")
    return arr


def make_defect(image: np.ndarray, rng: np.random.Generator, family: str, area: float, donor: np.ndarray | None = None) -> SyntheticDefect:
    """One synthetic defect of ``family`` covering about ``area`` of the image.

    ``image`` is float32 (H, W, 3) in [0, 1]; ``area`` a fraction of the image (0.0005 .. 0.1 is the useful range
    for the local families, LOGICAL_AREA for the logical one);
    ``donor`` another good image (any size) that cutpaste and texture take material from (default: the image
    itself). A defect that comes out invisible or far from the asked size (pasted onto an identical
    background, warped in a plain region) is tried again elsewhere; after MAX_TRIES the closest is kept.
    Grayscale images (three equal channels) are worked on as one channel, so they stay grayscale.
    """
    if family not in _MAKERS:
        raise ValueError(f"unknown defect family {family!r}; expected one of {', '.join(ALL_FAMILIES)}")
    if not 0 < area < 1:
        raise ValueError(f"area must be a fraction of the image between 0 and 1, got {area}")
    rgb = _as_image(image, "image")
    grey = bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))
    work = rgb[..., :1] if grey else rgb
    source = work if donor is None else _as_image(donor, "donor")
    if donor is not None and grey:
        source = source.mean(axis=2, keepdims=True)
    H, W = work.shape[:2]
    target = area * H * W
    draw = _centre_sampler(work, rng)
    best: tuple[float, Window, np.ndarray, np.ndarray] | None = None
    scale = 1.0
    for _ in range(MAX_TRIES):
        win, new = _MAKERS[family](work, source, rng, *draw(), max(target * scale, 4.0))
        new = np.clip(new, 0, 1).astype(np.float32)
        changed = np.abs(new - work[win]).max(axis=2) >= VISIBLE
        # Pinholes where new content happens to match the old belong to the defect, as a person would outline it.
        changed |= _fill_holes(ndimage.binary_closing(changed))
        got = int(changed.sum())
        error = abs(math.log(got / target)) if got else math.inf
        if best is None or error < best[0]:
            best = (error, win, new, changed)
        if error <= math.log(AREA_SLACK):
            break
        # Grown gently: a miss is as often the place (a plain surface) as the size.
        scale = float(np.clip(scale * np.clip(target / max(got, 1), 0.5, 1.5), 0.3, 4.0))
    _, win, new, changed = best
    out = work.copy()
    out[win][changed] = new[changed]
    mask = np.zeros((H, W), bool)
    mask[win] = changed
    if grey:
        out = np.repeat(out, 3, axis=2)
    return SyntheticDefect(out, mask, family, float(mask.mean()))


def synthesize(images: Sequence[np.ndarray], n: int, seed: int = 0, families: Sequence[str] = FAMILIES,
               min_area: float = 0.0005, max_area: float = 0.1) -> list[SyntheticDefect]:
    """``n`` defects cycling through ``families``, areas log-uniform in [min_area, max_area] (LOGICAL_AREA for
    the logical family, whose defects are components), the i-th on images[i % len(images)].

    Each defect has its own generator seeded by (seed, i), so defect i is the same whatever ``n`` is;
    its donor is one of the other images, so pasted material is foreign to the image it lands on.
    """
    if not len(images):
        raise ValueError("synthesize needs at least one good image")
    unknown = [f for f in families if f not in _MAKERS]
    if unknown or not len(families):
        raise ValueError(f"unknown or no defect families {unknown}; expected some of {', '.join(ALL_FAMILIES)}")
    if not 0 < min_area <= max_area < 1:
        raise ValueError(f"need 0 < min_area <= max_area < 1, got {min_area} and {max_area}")
    defects = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        family = families[i % len(families)]
        lo, hi = LOGICAL_AREA if family == LOGICAL else (min_area, max_area)
        area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        k = i % len(images)
        donor = images[(k + int(rng.integers(1, len(images)))) % len(images)] if len(images) > 1 else None
        defects.append(make_defect(images[k], rng, family, area, donor))
    return defects


def resize_longest(rgb: np.ndarray, size: int) -> np.ndarray:
    """Shrink so the longest side is at most ``size``, keeping the aspect ratio: defects are judged at model resolution."""
    H, W = rgb.shape[:2]
    factor = size / max(H, W)
    if factor >= 1:
        return rgb
    shape = (max(1, round(W * factor)), max(1, round(H * factor)))
    return np.stack([np.asarray(Image.fromarray(rgb[..., c], mode="F").resize(shape, Image.BILINEAR)) for c in range(3)], axis=2)


def defects_from(images: Sequence, n: int, seed: int = 0, max_side: int = 1024,
                 families: Sequence[str] = FAMILIES) -> tuple[list[np.ndarray], list[SyntheticDefect]]:
    """The good images (decoded, longest side at most ``max_side``) and about ``n`` defects made from them, at least two each.

    Defects are made near native resolution, so tiled detectors see them as they would see real
    ones; the detectors themselves resize as they would any input.
    """
    goods = [resize_longest(load_rgb(p), max_side) for p in images]
    if not goods:
        raise ValueError("defects_from needs at least one good image")
    per_image = max(2, math.ceil(n / len(goods)))
    return goods, synthesize(goods, per_image * len(goods), seed=seed, families=families)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def _tile_pair(defect: SyntheticDefect, tile: int) -> tuple[Image.Image, Image.Image]:
    """The defect and the same with its mask outlined in red, fitted into tile x tile (outline drawn outside the mask so it hides nothing)."""
    H, W = defect.mask.shape
    factor = tile / max(H, W)
    size = (max(1, round(W * factor)), max(1, round(H * factor)))
    image = Image.fromarray(_to_uint8(defect.image)).resize(size, Image.BILINEAR)
    mask = np.asarray(Image.fromarray(defect.mask.astype(np.uint8) * 255).resize(size, Image.BILINEAR)) > 0
    ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
    overlay = np.asarray(image).copy()
    overlay[ring] = (255, 0, 0)
    return image, Image.fromarray(overlay)


def write_gallery(images: Sequence[np.ndarray], out: Path, n: int = 24, seed: int = 0, tile: int = 256) -> list[Path]:
    """Write ``n`` synthetic defects for a person to judge: gallery.png (each defect beside its outlined mask)
    plus defect_XXX_<family>.png and defect_XXX_mask.png. Returns the written paths, the gallery first.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    defects = synthesize(images, n, seed, families=ALL_FAMILIES)
    written = []
    for i, d in enumerate(defects):
        Image.fromarray(_to_uint8(d.image)).save(out / f"defect_{i:03d}_{d.family}.png")
        Image.fromarray(d.mask.astype(np.uint8) * 255).save(out / f"defect_{i:03d}_mask.png")
        written += [out / f"defect_{i:03d}_{d.family}.png", out / f"defect_{i:03d}_mask.png"]
    contact_sheet(defects, tile).save(out / "gallery.png")
    return [out / "gallery.png", *written]


def contact_sheet(defects: Sequence[SyntheticDefect], tile: int = 256, pairs: int = 4) -> Image.Image:
    """Rows of (defect, defect with its mask outlined), captioned with family and area."""
    caption, gap = 14, 4
    stride = 2 * tile + 4 * gap
    tiles = [_tile_pair(d, tile) for d in defects]
    rows = [tiles[r:r + pairs] for r in range(0, len(tiles), pairs)]
    heights = [max(image.height for image, _ in row) + caption + gap for row in rows]  # strips make short rows
    sheet = Image.new("RGB", (pairs * stride - 3 * gap, max(sum(heights), 1)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i, (d, (image, overlay)) in enumerate(zip(defects, tiles, strict=True)):
        x, y = (i % pairs) * stride, sum(heights[: i // pairs])
        draw.text((x + 2, y + 1), f"{i:03d} {d.family} {100 * d.area:.2f}%", fill=(230, 230, 230))
        sheet.paste(image, (x, y + caption))
        sheet.paste(overlay, (x + image.width + gap, y + caption))
    return sheet
