"""TensorFlow-style 'SAME' padding, needed to reproduce weights trained in JAX/TF.

For input length ``n``, kernel ``k``, stride ``s`` and dilation ``d`` the total padding is
``max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)``, split with the smaller half first
(top/left), exactly as TF does. It depends on the input size, so it is computed per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.helpers import to_2tuple


def get_same_padding(n: int, k: int, s: int, d: int = 1) -> int:
    """Total TF-'SAME' padding along one axis."""
    return max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)


def pad_same(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int] = (1, 1), value=0.0
) -> torch.Tensor:
    """Pad an NCHW tensor so that a following VALID conv/pool behaves like TF 'SAME'."""
    ih, iw = x.shape[-2:]
    ph = get_same_padding(ih, kernel[0], stride[0], dilation[0])
    pw = get_same_padding(iw, kernel[1], stride[1], dilation[1])
    if ph > 0 or pw > 0:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=value)
    return x


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TF 'SAME' padding computed from the input size."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MaxPool2dSame(nn.MaxPool2d):
    """``nn.MaxPool2d`` with TF 'SAME' padding; padded cells are -inf so they never win."""

    def __init__(self, kernel_size, stride=None, dilation=1, ceil_mode=False):
        kernel_size = to_2tuple(kernel_size)
        stride = to_2tuple(stride if stride is not None else kernel_size)
        dilation = to_2tuple(dilation)
        super().__init__(kernel_size, stride, (0, 0), dilation, ceil_mode=ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation, value=-float("inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride, (0, 0), self.dilation, self.ceil_mode)
