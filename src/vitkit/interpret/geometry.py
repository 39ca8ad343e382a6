"""Captured attention in image coordinates: where one query pixel looks, per layer and head, as an image.

Each family arranges its queries and keys differently; :func:`attention_to_image` reads the layout from the
recorded layer (its module and input shape, see :func:`capture_attention`) and returns, for the token that
holds the query pixel, its attention probabilities painted onto the image pixels each key token covers:

* ViT (and LaViT): a token grid (class/prefix tokens dropped); LaViT's keys may sit on a coarser,
  spatially reduced grid, and its transformed (inherited) attention is painted the same way.
* NesT: at each level, the query's block only (local attention); tokens of level ``l`` cover
  ``patch_size * 2^l`` pixels.
* HaloNet: the query's block window, ``(b + 2h)^2`` feature pixels around its ``b x b`` block; keys in the
  zero padding outside the map carry probability but no pixel, so their mass is dropped.
* MobileViT: the sequence of patches for the query's intra-patch offset: keys are the pixels at the same
  offset in every patch (v1: query-dependent attention; v2: the separable context scores, the same for every
  query of that offset).

The result is ``(B, heads, H, W)`` (``heads`` is 1 for MobileViT v2) in probability per key token, so the
values of the distinct key cells sum to the mass that falls inside the image (1 for a row that never sees
padding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.interpret.attention import AttentionRecord
from vitkit.layers.halo_attention import HaloAttention


def _parent(model: nn.Module, name: str, types: tuple[type, ...]) -> nn.Module | None:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        m = model.get_submodule(".".join(parts[:i]))
        if isinstance(m, types):
            return m
    return None


def _grid_for(n: int, aspect: float) -> tuple[int, int]:
    """A (rows, cols) grid of ``n`` cells whose rows / cols is closest to ``aspect`` (image H / W)."""
    best = None
    for r in range(1, n + 1):
        if n % r == 0:
            err = abs(math.log(r / (n // r)) - math.log(aspect))
            if best is None or err < best[0]:
                best = (err, (r, n // r))
    return best[1]


def _paint(cells: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, heads, gh, gw) values per cell -> (B, heads, H, W): each image pixel takes its cell's value."""
    return F.interpolate(cells, size=size, mode="nearest")


def _query_cell(query: tuple[int, int], size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    py, px = query
    if not (0 <= py < size[0] and 0 <= px < size[1]):
        raise ValueError(f"attention_to_image: query pixel {query} is outside the {size[0]}x{size[1]} image")
    return min(grid[0] - 1, py * grid[0] // size[0]), min(grid[1] - 1, px * grid[1] // size[1])


def attention_to_image(
    model: nn.Module, record: AttentionRecord, img_size: tuple[int, int], query: tuple[int, int]
) -> torch.Tensor:
    """Attention of the token holding image pixel ``query = (y, x)`` over the image: ``(B, heads, H, W)``.

    ``record`` comes from :func:`vitkit.interpret.capture_attention` on ``model`` with an input of
    ``img_size = (H, W)``.
    """
    from vitkit.models.mobilevit import LinearSelfAttention, MobileViTBlock, MobileViTV2Block
    from vitkit.models.nest import NestLevel

    size = tuple(img_size)
    p = record.probs.float()
    owner = record.module
    if isinstance(owner, HaloAttention):
        return _halo(owner, p, record.input_shape, size, query)
    if isinstance(owner, LinearSelfAttention):
        block = _parent(model, record.layer, (MobileViTV2Block,))
        return _patch_sequence(p.transpose(1, 2)[:, :, None], block.patch, record.input_shape[-1], size, query, 1)
    level = _parent(model, record.layer, (NestLevel,))
    if level is not None:
        return _nest(level, p, size, query)
    block = _parent(model, record.layer, (MobileViTBlock,))
    if block is not None:  # (B*P, heads, N, N): one sequence per intra-patch offset
        P = block.patch[0] * block.patch[1]
        p = p.reshape(-1, P, *p.shape[1:])  # (B, P, heads, N, N)
        return _patch_sequence(p, block.patch, p.shape[-1], size, query, p.shape[2])
    return _tokens(model, record, p, size, query)


def _tokens(model, record, p, size, query):
    """ViT / LaViT: (B, heads, N, M) over token grids (prefix tokens dropped)."""
    prefix = getattr(model, "num_prefix_tokens", 0)
    grid_q = record.grid or _grid_for(p.shape[-2] - prefix, size[0] / size[1])
    n_keys = p.shape[-1] - prefix
    grid_k = grid_q if n_keys == grid_q[0] * grid_q[1] else _grid_for(n_keys, grid_q[0] / grid_q[1])
    qy, qx = _query_cell(query, size, grid_q)
    row = p[:, :, prefix + qy * grid_q[1] + qx, prefix:]  # (B, heads, M)
    return _paint(row.reshape(*row.shape[:2], *grid_k), size)


def _nest(level, p, size, query):
    """NesT level: (B*T, heads, N, N), T blocks of N tokens; the query sees its own block."""
    (gh, gw), (bh, bw) = level.grid, level.block
    grid = (gh * bh, gw * bw)
    qy, qx = _query_cell(query, size, grid)
    t, i = (qy // bh) * gw + qx // bw, (qy % bh) * bw + qx % bw
    p = p.reshape(-1, gh * gw, *p.shape[1:])  # (B, T, heads, N, N)
    row = p[:, t, :, i, :].reshape(p.shape[0], p.shape[2], bh, bw)  # (B, heads, bh, bw)
    cells = row.new_zeros(row.shape[0], row.shape[1], *grid)
    y0, x0 = (qy // bh) * bh, (qx // bw) * bw
    cells[:, :, y0 : y0 + bh, x0 : x0 + bw] = row
    return _paint(cells, size)


def _patch_sequence(p, patch, n, size, query, heads):
    """MobileViT: p (B, P, heads, N, N) or (B, P, 1, 1, N) (v2 scores); keys share the query's offset."""
    ph, pw = patch
    nh, nw = _grid_for(n, size[0] / size[1])
    grid = (nh * ph, nw * pw)
    fy, fx = _query_cell(query, size, grid)
    off, n_q = (fy % ph) * pw + fx % pw, (fy // ph) * nw + fx // pw
    row = p[:, off, :, n_q if p.shape[-2] > 1 else 0, :]  # (B, heads, N)
    cells = row.new_zeros(row.shape[0], heads, *grid)
    cells[:, :, fy % ph :: ph, fx % pw :: pw] = row.reshape(row.shape[0], heads, nh, nw)
    return _paint(cells, size)


def _halo(layer: HaloAttention, p, input_shape, size, query):
    """HaloNet: p (B*heads, blocks, bs*bs, win*win) on the layer's (Hf, Wf) input map."""
    Hf, Wf = input_shape[-2:]
    b, h, s, bs, win = layer.block_size, layer.halo_size, layer.block_stride, layer.block_size_ds, layer.win_size
    nh, nw = math.ceil(Hf / b), math.ceil(Wf / b)
    heads = layer.num_heads
    fy, fx = _query_cell(query, size, (Hf, Wf))
    by, bx = fy // b, fx // b
    iy, ix = (fy - by * b) // s, (fx - bx * b) // s
    p = p.reshape(-1, heads, nh * nw, bs * bs, win, win)
    row = p[:, :, by * nw + bx, iy * bs + ix]  # (B, heads, win, win)
    cells = row.new_zeros(row.shape[0], heads, Hf, Wf)
    y0, x0 = by * b - h, bx * b - h  # window origin on the map; clip to the image
    ys, xs = slice(max(0, -y0), min(win, Hf - y0)), slice(max(0, -x0), min(win, Wf - x0))
    cells[:, :, y0 + ys.start : y0 + ys.stop, x0 + xs.start : x0 + xs.stop] = row[:, :, ys, xs]
    return _paint(cells, size)


def mean_attention_distance_image(
    model: nn.Module, record: AttentionRecord, img_size: tuple[int, int], queries: int = 8
) -> torch.Tensor:
    """Mean attention distance in pixels per head for any family: ``(heads,)``.

    For a ``queries x queries`` grid of query pixels, the attention painted on the image
    (:func:`attention_to_image`) weights the distance from the query pixel to every image pixel; the weighted
    mean (normalised by the painted mass) is averaged over queries and images. Each key token counts with the
    mean distance over the pixels it covers, so a query attending only to its own token scores about 0.4 of
    the token's side, not 0 (the ViT-token version, :func:`mean_attention_distance`, uses token centres).
    """
    H, W = img_size
    yy = torch.arange(H, dtype=torch.float32)[:, None] + 0.5
    xx = torch.arange(W, dtype=torch.float32)[None, :] + 0.5
    total = None
    for qy in ((torch.arange(queries) + 0.5) * H / queries).long().tolist():
        for qx in ((torch.arange(queries) + 0.5) * W / queries).long().tolist():
            heat = attention_to_image(model, record, img_size, (qy, qx)).cpu()
            dist = torch.sqrt((yy - qy - 0.5) ** 2 + (xx - qx - 0.5) ** 2)
            d = ((heat * dist).sum((-2, -1)) / heat.sum((-2, -1)).clamp_min(1e-12)).mean(0)
            total = d if total is None else total + d
    return total / queries**2
