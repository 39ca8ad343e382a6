"""Convolution + BatchNorm + activation and a pooled classifier head (timm names: ConvNormAct, ClassifierHead)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round a channel count to a multiple of ``divisor``, never dropping more than 10% (MobileNet rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class ConvNormAct(nn.Module):
    """``conv`` (no bias, symmetric padding) -> ``bn`` -> ``act`` (identity when ``act_layer`` is None)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act_layer: type[nn.Module] | None = nn.ReLU,
        dilation: int = 1,
    ):
        super().__init__()
        pad = (kernel_size - 1) // 2 * dilation
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, pad, dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> int:
    """Fold every :class:`ConvNormAct`'s BatchNorm into its convolution, in place, for inference.

    ``conv(x) * g + c`` with ``g = gamma / sqrt(running_var + eps)`` and ``c = beta - running_mean * g`` is one
    convolution with weights scaled per output channel and a bias; ``bn`` becomes an identity. Outputs are the
    same up to rounding. The model must be in eval mode (training-mode BatchNorm normalises with batch
    statistics, which cannot be folded). Returns the number of folded pairs.
    """
    if model.training:
        raise ValueError("fuse_conv_bn: call model.eval() first (training-mode BatchNorm cannot be folded)")
    n = 0
    for m in model.modules():
        if isinstance(m, ConvNormAct) and isinstance(m.bn, nn.BatchNorm2d) and m.bn.track_running_stats:
            conv, bn = m.conv, m.bn
            g = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
            shift = (bn.bias if bn.affine else 0) - bn.running_mean * g
            fused = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
                bias=True,
                padding_mode=conv.padding_mode,
            ).to(device=conv.weight.device, dtype=conv.weight.dtype)
            fused.weight.copy_(conv.weight * g.reshape(-1, 1, 1, 1))
            fused.bias.copy_(shift + (conv.bias * g if conv.bias is not None else 0))
            m.conv, m.bn = fused, nn.Identity()
            n += 1
    return n


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> ``fc`` (identity when ``num_classes`` is 0)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop_rate = drop_rate
        self._in_features = in_features
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int) -> None:
        self.fc = nn.Linear(self._in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.dropout(x.mean(dim=(2, 3)), p=self.drop_rate, training=self.training)  # (B, C)
        return x if pre_logits else self.fc(x)
