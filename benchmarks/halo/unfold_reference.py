"""A straightforward unfold-based halo attention (the approach of timm's HaloAttn), for speed comparison.

Written from the algorithm: pad the key/value map by the halo, unfold (b + 2h)^2 windows with step b, compute
q k^T with einsum, add relative logits computed by the pad-and-reshape trick of Bello et al.'s relative
attention (the same logits as vitkit's gather), softmax, weight the values, fold the blocks back.
It shares parameters with a :class:`vitkit.layers.HaloAttention` so outputs can be compared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rel_1d(q: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """q (N, W, Wq, d) with queries along dim 2 -> logits (N, W, Wq, win) in absolute window positions."""
    n, rows, w, _ = q.shape
    r = table.shape[0]
    win = (r + 1) // 2
    x = (q @ table.t()).reshape(-1, w, r)  # (N*rows, Wq, R)
    x = F.pad(x, [0, 1]).flatten(1)  # shift trick: pad a column, flatten, pad the tail, re-cut rows
    x = F.pad(x, [0, r - w]).reshape(-1, w + 1, r)
    return x[:, :w, win - 1 :].reshape(n, rows, w, win)


def unfold_halo_attention(layer, x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    b, h, win, bs = layer.block_size, layer.halo_size, layer.win_size, layer.block_size_ds
    heads, dqk, dv = layer.num_heads, layer.dim_head_qk, layer.dim_head_v
    nh, nw = H // b, W // b
    q = layer.q(x).reshape(B * heads, dqk, nh, bs, nw, bs)
    q = q.permute(0, 2, 4, 3, 5, 1).reshape(B * heads * nh * nw, bs, bs, dqk)  # (N, y, x, d)
    kv = F.pad(layer.kv(x), [h, h, h, h]).unfold(2, win, b).unfold(3, win, b)
    kv = kv.reshape(B * heads, dqk + dv, nh * nw, win * win).permute(0, 2, 3, 1).reshape(-1, win * win, dqk + dv)
    k, v = kv[..., :dqk], kv[..., dqk:]
    logits = torch.einsum("nqd,nkd->nqk", q.reshape(-1, bs * bs, dqk), k) * layer.scale
    rw = _rel_1d(q, layer.pos_embed.width_rel)  # (N, y, x, kx)
    rh = _rel_1d(q.transpose(1, 2), layer.pos_embed.height_rel).transpose(1, 2)  # (N, y, x, ky)
    rel = (rh[..., :, None] + rw[..., None, :]).reshape(-1, bs * bs, win * win)
    attn = (logits + rel).softmax(dim=-1)
    out = torch.einsum("nqk,nkd->nqd", attn, v)  # (N, bs*bs, dv)
    out = out.reshape(B, heads, nh, nw, bs, bs, dv).permute(0, 1, 6, 2, 4, 3, 5)
    return layer.pool(out.reshape(B, heads * dv, nh * bs, nw * bs))
