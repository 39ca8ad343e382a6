"""Normalisation layers used by the convolutional parts of the families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNormAct(nn.GroupNorm):
    """GroupNorm followed by an optional activation (ReLU by default), keeping GroupNorm's parameter names."""

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        apply_act: bool = True,
        act_layer: type[nn.Module] = nn.ReLU,
    ):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
