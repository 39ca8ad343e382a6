"""Weight-standardised convolutions (Qiao et al. 2019; used by BiT and the hybrid ViT's ResNet).

Each output filter's weights are normalised to zero mean and unit (biased) variance before the
convolution; ``eps`` is added to the variance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.padding import pad_same


def standardize_weight(weight: torch.Tensor, eps: float) -> torch.Tensor:
    # mean and biased variance as two reductions (torch.var_mean is one op that Core ML and ExecuTorch reject)
    w = weight.reshape(weight.shape[0], -1)
    centred = w - w.mean(dim=1, keepdim=True)
    return (centred * torch.rsqrt(centred.square().mean(dim=1, keepdim=True) + eps)).reshape_as(weight)


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation and symmetric padding ``((k - 1) * d) // 2``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, groups=1, bias=False, eps=1e-6):
        padding = ((kernel_size - 1) * dilation) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = standardize_weight(self.weight, self.eps)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv2dSame(nn.Conv2d):
    """Conv2d with weight standardisation and TF 'SAME' padding (the official JAX hybrid ViT)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, groups=1, bias=False, eps=1e-6):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        w = standardize_weight(self.weight, self.eps)
        return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
