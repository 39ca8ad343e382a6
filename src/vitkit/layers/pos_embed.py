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
    """Resample ``posemb`` [P, prefix + Ho*Wo, C] to [P, prefix + Hn*Wn, C] (P = 1 but for ViT's per-layer
    embeddings, ``pos_embed_every_layer='every'``, where each of the P is resampled on its own).

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
    p = posemb.shape[0]
    grid = grid.float().reshape(p, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)  # (P, C, Ho, Wo)
    grid = F.interpolate(grid, size=tuple(new_size), mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(p, -1, dim).to(dtype)  # (P, Hn*Wn, C)
    return torch.cat([prefix, grid], dim=1)


def resample_axis_pos_embed(posemb: torch.Tensor, new_len: int) -> torch.Tensor:
    """Resample a per-axis embedding ``[P, L_old, C]`` (ViT's 2-D X or Y embedding) to ``[P, new_len, C]``.

    Linear interpolation in float32 with ``align_corners=False`` (each entry is the centre of one patch row or
    column): the 1-D counterpart of the bilinear/bicubic grid resampling above.
    """
    if posemb.shape[1] == new_len:
        return posemb
    x = posemb.float().transpose(1, 2)  # (P, C, L_old)
    x = F.interpolate(x, size=new_len, mode="linear", align_corners=False)
    return x.transpose(1, 2).to(posemb.dtype)
