"""Image to patch tokens: a conv with kernel = stride = patch size (ViT eq. 1)."""

from __future__ import annotations

import torch
from torch import nn

from vitkit.layers.helpers import to_2tuple


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each to ``embed_dim``.

    Returns tokens ``[B, N, C]`` (or the NCHW map when ``flatten=False``). Input size checks are
    done by the owning model, which knows its name and whether it accepts dynamic sizes.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        flatten: bool = True,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.reduction = self.patch_size  # input pixels per token, per axis
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H/p, W/p)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        return x
