"""Absolute position-embedding resampling for other input resolutions.

Follows timm's ``resample_abs_pos_embed``: prefix tokens (class/distillation) are kept as
they are; the grid part is reshaped to its 2-D layout and resampled with bicubic,
antialiased interpolation in float32 (the official ViT code uses bilinear ``zoom``; bicubic
+ antialias is what timm checkpoints are fine-tuned with). Non-square grids are supported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_abs_pos_embed(
    posemb: torch.Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample ``posemb`` [1, prefix + Ho*Wo, C] to [1, prefix + Hn*Wn, C].

    Args:
        posemb: the position embedding, prefix tokens first.
        new_size: target grid (rows, cols).
        old_size: source grid; inferred as square when omitted.
        num_prefix_tokens: leading tokens that are not part of the grid.
    """
    num_pos = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        side = int(math.isqrt(num_pos))
        if side * side != num_pos:
            raise ValueError(
                f"resample_abs_pos_embed: {num_pos} grid tokens is not a square grid; pass old_size explicitly"
            )
        old_size = (side, side)
    if old_size[0] * old_size[1] != num_pos:
        raise ValueError(f"resample_abs_pos_embed: old_size {old_size} does not hold {num_pos} grid tokens")
    if tuple(new_size) == tuple(old_size):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim, dtype = posemb.shape[-1], posemb.dtype
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)  # (1, C, Ho, Wo)
    grid = F.interpolate(grid, size=tuple(new_size), mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(dtype)  # (1, Hn*Wn, C)
    return torch.cat([prefix, grid], dim=1)
