"""The pre-norm Transformer block (ViT eq. 2-3), shared by ViT, NesT, MobileViT and LaViT."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from vitkit.layers.attention import Attention
from vitkit.layers.drop import DropPath
from vitkit.layers.mlp import Mlp

LayerNormEps6 = partial(nn.LayerNorm, eps=1e-6)  # the ViT/timm default norm


class Block(nn.Module):
    """``x + DropPath(MSA(LN(x)))`` then ``x + DropPath(MLP(LN(x)))`` on tokens ``[B, N, C]``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = LayerNormEps6,
        attn_layer: type[nn.Module] = Attention,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))
