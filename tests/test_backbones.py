"""The backbones are the real pretrained networks, not random ones, and their taps are right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image

from defectlens.backbones import create_backbone, fuse_conv_bn, get_spec
from defectlens.backbones.weights import load_state_dict
from defectlens.errors import DefectLensError, WeightsError

MILITARY_UNIFORM = 652  # ImageNet class of the well-known Grace Hopper portrait


def _grace_hopper(mean, std) -> torch.Tensor:
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        im = Image.open(fh).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_pretrained_weights_classify_a_known_photo(name):
    spec = get_spec(name)
    model = spec.build().eval()
    x = _grace_hopper(spec.mean, spec.std)
    with torch.no_grad():
        random_probs = model(x).softmax(1)
        state, digest = load_state_dict(spec.weights.locate(), spec.weights.sha256)
        model.load_state_dict(state)
        probs = model(x).softmax(1)
    assert digest == spec.weights.sha256
    assert int(probs.argmax()) == MILITARY_UNIFORM and float(probs.max()) > 0.3
    assert float(random_probs.max()) < 0.05  # a random network has no opinion


@pytest.mark.parametrize("name, channels", [("mobilenet_v2", (192, 576)), ("efficientnet_lite0", (240, 672)),
                                           ("efficientnet_lite1", (240, 672)), ("efficientnet_lite2", (288, 720))])
def test_taps_at_strides_8_and_16(name, channels):
    extractor, digest = create_backbone(name)
    assert len(digest) == 64
    with torch.no_grad():
        feats = extractor(torch.rand(1, 3, 96, 128))
    assert [f.shape[1] for f in feats] == list(channels)
    assert [tuple(f.shape[-2:]) for f in feats] == [(12, 16), (6, 8)]


@pytest.mark.parametrize("name, channels", [("mobilenet_v2", (32, 96)), ("efficientnet_lite0", (40, 112))])
def test_block_output_taps_are_the_inputs_of_the_tap_blocks(name, channels):
    """`features="blocks"` returns what the tap blocks take in (timm's and anomalib's features),
    computed by the same weights as the expanded taps, without the last tap block's weights."""
    expanded, _ = create_backbone(name)
    blocks, _ = create_backbone(name, kind="blocks")
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        feats = blocks(x)
        inputs, h = [], (x - expanded.mean) / expanded.std
        for i, block in enumerate(expanded.blocks):
            if i in expanded.tap_indices:
                inputs.append(h)
            h = block(h)
    assert [f.shape[1] for f in feats] == list(channels)
    assert [tuple(f.shape[-2:]) for f in feats] == [(12, 16), (6, 8)]
    for got, want in zip(feats, inputs, strict=True):
        torch.testing.assert_close(got, want)
    assert len(blocks.blocks) == len(expanded.blocks) - 1


def test_batchnorm_folding_keeps_outputs():
    extractor, _ = create_backbone("efficientnet_lite0")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = extractor(x)
        fused = fuse_conv_bn(extractor)(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.modules())
    for a, b in zip(ref, fused, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_weight_files_are_checked(tmp_path):
    spec = get_spec("mobilenet_v2")
    with pytest.raises(WeightsError, match="does not match"):
        load_state_dict(spec.weights.locate(), "0" * 64)
    text = tmp_path / "w.pth"
    text.write_text("not weights")
    with pytest.raises(WeightsError, match="not a PyTorch weights file"):
        create_backbone("mobilenet_v2", weights=text)
    with pytest.raises(WeightsError, match="not mobilenet_v2 weights"):
        create_backbone("mobilenet_v2", weights=get_spec("efficientnet_lite0").weights.locate())
    with pytest.raises(WeightsError, match="not found"):
        create_backbone("mobilenet_v2", weights=tmp_path / "missing.pth")
    with pytest.raises(DefectLensError, match="unknown backbone"):
        create_backbone("resnet9000")


def test_user_weights_file_is_accepted(tmp_path):
    spec = get_spec("mobilenet_v2")
    state, _ = load_state_dict(spec.weights.locate())
    path = tmp_path / "mine.pth"
    torch.save({"state_dict": state}, path)  # checkpoint-style wrapper is unwrapped
    extractor, digest = create_backbone("mobilenet_v2", weights=path)
    assert len(digest) == 64 and extractor.strides == (8, 16)


@pytest.mark.parametrize(("name", "channels"), [("resnet18", (128, 256)), ("wide_resnet50_2", (512, 1024))])
def test_user_resnet_weights_in_torchvision_layout(name, channels, tmp_path):
    """No package ships these weights: a user's torchvision file loads, its sha256 is kept,
    and the extractor stops after layer3 (layer4 is neither run nor stored)."""
    import torch

    from defectlens.backbones import create_backbone
    from defectlens.backbones.registry import get_spec
    from defectlens.errors import WeightsError

    model = get_spec(name).build().eval()
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    extractor, digest = create_backbone(name, weights=path)
    assert len(digest) == 64
    feats = extractor(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(channels) and [f.shape[-1] for f in feats] == [8, 4]
    assert not any(k.startswith("blocks.4.") or "layer4" in k for k in extractor.state_dict())
    with torch.no_grad():
        ref = model.layer3(model.layer2(model.layer1(torch.nn.functional.max_pool2d(
            torch.relu(model.bn1(model.conv1((torch.full((1, 3, 64, 64), 0.5) - extractor.mean) / extractor.std))), 3, 2, 1))))
    assert torch.allclose(extractor(torch.full((1, 3, 64, 64), 0.5))[1], ref, atol=1e-5)
    with pytest.raises(WeightsError, match="ships no weights"):
        create_backbone(name)
    other = "wide_resnet50_2" if name == "resnet18" else "resnet18"
    torch.save(get_spec(other).build().state_dict(), tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=f"not {name} weights"):
        create_backbone(name, weights=tmp_path / "other.pth")
