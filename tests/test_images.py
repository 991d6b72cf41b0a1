from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from defectlens.data import images as img_mod
from defectlens.data.images import iter_batches, load_for_model, load_rgb, spread
from defectlens.errors import ImageError


@pytest.fixture
def gradient() -> np.ndarray:
    x = np.linspace(0, 255, 40, dtype=np.float32)
    rgb = np.stack([np.tile(x, (30, 1)), np.tile(x[::-1], (30, 1)), np.full((30, 40), 128.0)], axis=2)
    return rgb.astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_formats_load_as_rgb_float(tmp_path, gradient, suffix):
    path = tmp_path / f"a{suffix}"
    Image.fromarray(gradient).save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.float32
    tolerance = 0.08 if suffix == ".jpg" else 1e-6
    np.testing.assert_allclose(rgb, gradient / 255.0, atol=tolerance)


def test_grayscale_rgba_palette(tmp_path, gradient):
    Image.fromarray(gradient[..., 0]).save(tmp_path / "g.png")
    g = load_rgb(tmp_path / "g.png")
    np.testing.assert_allclose(g[..., 0], g[..., 2])
    rgba = np.dstack([gradient, np.full((30, 40), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(load_rgb(tmp_path / "a.png"), gradient / 255.0, atol=1e-6)
    Image.fromarray(gradient).convert("P").save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png").shape == (30, 40, 3)


def test_16bit_keeps_precision(tmp_path):
    data = np.array([[0, 1000, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(data).save(tmp_path / "d.png")
    rgb = load_rgb(tmp_path / "d.png")
    np.testing.assert_allclose(rgb[0, :, 0], [0.0, 1000 / 65535, 1.0], rtol=1e-6)


def test_exif_orientation_is_honoured(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # white band on the left
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # camera rotated: display rotated 90 degrees clockwise
    im.save(tmp_path / "o.jpg", exif=exif)
    rgb = load_rgb(tmp_path / "o.jpg")
    assert rgb.shape[:2] == (40, 20)
    assert rgb[:10].mean() > 0.9 and rgb[-10:].mean() < 0.1  # band now on top


def test_arrays_are_accepted(gradient):
    np.testing.assert_allclose(load_rgb(gradient), gradient / 255.0)
    assert load_rgb(gradient[..., 0]).shape == (30, 40, 3)
    with pytest.raises(ImageError, match="array"):
        load_rgb(np.zeros((2, 2, 2, 2)))


def test_resize_to_model_input(tmp_path, gradient):
    Image.fromarray(gradient).save(tmp_path / "a.png")
    loaded = load_for_model(tmp_path / "a.png", 32)
    assert loaded.pixels.shape == (3, 32, 32) and loaded.size == (30, 40) and loaded.preview is None


def test_one_read_gives_pixels_digest_and_a_bounded_preview(tmp_path):
    import hashlib

    big = (np.random.default_rng(0).random((600, 900, 3)) * 255).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    loaded = load_for_model(tmp_path / "big.png", 32, preview_side=300)
    assert loaded.digest == hashlib.sha256((tmp_path / "big.png").read_bytes()).hexdigest()
    assert loaded.preview.shape == (200, 300, 3) and loaded.preview.dtype == np.uint8
    (batch,) = iter_batches([tmp_path / "big.png", big], 32, 2, preview_side=300)
    assert batch.digests == [loaded.digest, None] and [p.shape for p in batch.previews] == [(200, 300, 3)] * 2


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "file not found"),
        (b"", "empty file"),
        (b"hello, this is text", "not an image"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as err:
        load_rgb(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_image(tmp_path, gradient):
    path = tmp_path / "t.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_rgb(path)


def test_folder_and_huge_image(tmp_path, monkeypatch, gradient):
    with pytest.raises(ImageError, match="is a folder"):
        load_rgb(tmp_path)
    Image.fromarray(gradient).save(tmp_path / "big.png")
    monkeypatch.setattr(img_mod, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="pixel limit"):
        load_rgb(tmp_path / "big.png")


def test_batches_keep_order_and_report_errors(tmp_path, gradient):
    good = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(p)
        good.append(p)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    inputs = [good[0], bad, *good[1:]]
    batches = list(iter_batches(inputs, 8, batch_size=2, skip_errors=True))
    indices = [i for b in batches for i in b.indices]
    assert indices == [0, 2, 3, 4, 5]
    assert [i for b in batches for i, _ in b.errors] == [1]
    first_pixels = np.concatenate([b.pixels for b in batches])[:, 0, 0, 0]
    np.testing.assert_allclose(first_pixels, [0, 40 / 255, 80 / 255, 120 / 255, 160 / 255], atol=1e-6)
    with pytest.raises(ImageError, match="bad.png"):
        list(iter_batches(inputs, 8, batch_size=2))


def test_spread_covers_the_whole_set():
    items = list(range(30))
    picked = spread(items, 16)
    assert len(picked) == 16 and picked[0] == 0 and picked[-1] == 29  # a fixed stride gave 0..15
    assert np.diff(picked).min() >= 1 and np.diff(picked).max() <= 2
    assert spread(items, 30) == items and spread(items, 99) == items
    assert spread(items, 1) == [0]
