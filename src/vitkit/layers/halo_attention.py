"""Blocked local self-attention with halos (HaloNet, Vaswani et al., CVPR 2021, arXiv 2103.12731).

The map is split into non-overlapping ``b x b`` query blocks; each block attends to the ``(b + 2h)^2`` window around
it (its block plus a halo of ``h`` pixels). Logits are ``q.k * d^-0.5`` plus factorised 2-D relative position logits
``q.r_h[dy] + q.r_w[dx]`` (tables ``height_rel``/``width_rel`` of ``2 * win - 1`` rows, index ``key_pos - query_pos +
win - 1`` with the query position counted in its strided block). A stride-``s`` layer computes queries at stride
``s`` from the full-resolution window. Parameter names and conventions follow timm's ``HaloAttn``, so timm
checkpoints load and give the same outputs.

Padding rule (any input size): the map is zero-padded on the bottom/right to a multiple of ``b`` ("size padding") and
by ``h`` on every side (the halo). ``mask_padding="size"`` (default, the reference's numerics) masks keys in the size
padding; halo keys beyond the image border are zeros that take part, as in the reference. ``mask_padding="all"``
masks every key outside the image, so the layer equals full attention over the map restricted to each block's window.
Query rows/columns in the size padding are computed and cropped away.

This is the plain reference layer: two routes, the fused one (``F.scaled_dot_product_attention``, the relative logits
and the mask as an additive bias) and the eager one, its probabilities through the ``attn_probs`` hook point. Speed
comes from ``torch.compile`` and the opt-in kernel of :mod:`vitkit.kernels.halo` (applied by ``vitkit.optimize``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.attention import fused_attn
from vitkit.layers.conv_bn import make_divisible

if TYPE_CHECKING:  # the interpret side of attention_geometry (type only)
    from vitkit.interpret import AttentionRecord
    from vitkit.interpret.geometry import ImageQuery

_MASKS = ("size", "all")


class PosEmbedRel(nn.Module):
    """Factorised relative position logits for a ``block x block`` query block over a ``win x win`` window."""

    def __init__(self, block_size: int, win_size: int, dim_head: int, scale: float):
        super().__init__()
        self.block_size, self.win_size = block_size, win_size
        self.height_rel = nn.Parameter(torch.randn(win_size * 2 - 1, dim_head) * scale)
        self.width_rel = nn.Parameter(torch.randn(win_size * 2 - 1, dim_head) * scale)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """``q``: (N, blocks, bs*bs, d) -> relative logits (N, blocks, bs*bs, win*win), ``rh[ky] + rw[kx]``. As the
        reference: the query times every table row (all ``2 * win - 1`` offsets), then its window keys' offsets."""
        bs, win = self.block_size, self.win_size
        pos = torch.arange(win, device=q.device)[None, :] - torch.arange(bs, device=q.device)[:, None]
        index = pos + win - 1  # (query position in the block, key position in the window) -> table row
        qb = q.reshape(-1, bs, bs, q.shape[-1])  # (N*blocks, y, x, d): rank 5 at most here, Core ML's limit
        # every offset, then the query's: (N*blocks, y, x, ky) by its row y, (N*blocks, y, x, kx) by its column x
        rh, rw = qb @ self.height_rel.t().to(q.dtype), qb @ self.width_rel.t().to(q.dtype)
        rh = rh.gather(-1, index[None, :, None].expand(*rh.shape[:-1], win))  # (gather: a dynamic batch)
        rw = rw.gather(-1, index[None, None].expand(*rw.shape[:-1], win))
        return (rh[..., :, None] + rw[..., None, :]).reshape(*q.shape[:2], bs * bs, win * win)


class HaloAttention(nn.Module):
    """Multi-head halo attention on NCHW maps (no output projection: the block's next 1x1 conv is one).

    Args:
        dim: input channels.
        dim_out: output (value) channels; defaults to ``dim``.
        stride: 1, or 2 for attention downsampling (strided queries; 2x2 average pooling if ``b % s`` or avg_down).
        num_heads: heads; value head width is ``dim_out // num_heads``.
        dim_head: query/key head width; default ``make_divisible(dim_out * qk_ratio, 8) // num_heads``.
        block_size, halo_size: query block side ``b``, halo ``h``.
        mask_padding: 'size' or 'all', see the module docstring.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        stride: int = 1,
        num_heads: int = 8,
        dim_head: int | None = None,
        block_size: int = 8,
        halo_size: int = 3,
        qk_ratio: float = 1.0,
        qkv_bias: bool = False,
        avg_down: bool = False,
        mask_padding: str = "size",
    ):
        super().__init__()
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f"HaloAttention: dim_out ({dim_out}) must be divisible by num_heads ({num_heads})")
        if stride not in (1, 2):
            raise ValueError(f"HaloAttention: stride must be 1 or 2, got {stride}")
        if mask_padding not in _MASKS:
            raise ValueError(f"HaloAttention: mask_padding must be one of {_MASKS}, got {mask_padding!r}")
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or make_divisible(dim_out * qk_ratio, 8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = num_heads * self.dim_head_v
        self.scale = self.dim_head_qk**-0.5
        self.block_size = self.block_size_ds = block_size
        self.halo_size = halo_size
        self.win_size = block_size + 2 * halo_size
        self.mask_padding = mask_padding
        use_pool = stride > 1 and (avg_down or block_size % stride != 0)
        self.block_stride = stride if stride > 1 and not use_pool else 1
        self.block_size_ds = block_size // self.block_stride
        self.fused_attn: bool | None = None  # None: the process-wide switch (vitkit.layers.use_fused_attn)
        self.q = nn.Conv2d(dim, self.dim_out_qk, 1, stride=self.block_stride, bias=qkv_bias)
        self.kv = nn.Conv2d(dim, self.dim_out_qk + self.dim_out_v, 1, bias=qkv_bias)
        self.pos_embed = PosEmbedRel(self.block_size_ds, self.win_size, self.dim_head_qk, self.scale)
        self.attn_probs = nn.Identity()  # hook point (eager path): (B*heads, blocks, bs*bs, win*win)
        self.pool = nn.AvgPool2d(2, 2) if use_pool else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.q.weight.shape[1] ** -0.5
        nn.init.trunc_normal_(self.q.weight, std=std)
        nn.init.trunc_normal_(self.kv.weight, std=std)
        nn.init.trunc_normal_(self.pos_embed.height_rel, std=self.scale)
        nn.init.trunc_normal_(self.pos_embed.width_rel, std=self.scale)

    def use_fused(self) -> bool:
        return fused_attn() if self.fused_attn is None else self.fused_attn

    def _key_bias(self, H: int, W: int, Hp: int, Wp: int, ref: torch.Tensor) -> torch.Tensor | None:
        """Additive bias (blocks, win*win): 0 for valid keys, the dtype's minimum for masked ones."""
        h, b, win = self.halo_size, self.block_size, self.win_size
        if self.mask_padding == "size" and (H, W) == (Hp, Wp):
            return None
        valid = torch.ones(Hp + 2 * h, Wp + 2 * h, dtype=torch.bool, device=ref.device)
        if self.mask_padding == "all":  # every key outside the image, the outer halo included
            valid[:h], valid[h + H :], valid[:, :h], valid[:, h + W :] = False, False, False, False
        else:  # the size padding only
            valid[h + H : h + Hp] = False
            valid[:, h + W : h + Wp] = False
        windows = valid.flatten()[self._windows(Hp // b, Wp // b, ref.device)].reshape(-1, win * win)
        bias = torch.zeros(windows.shape, dtype=ref.dtype, device=ref.device)
        return bias.masked_fill(~windows, torch.finfo(ref.dtype).min)

    def _windows(self, nh: int, nw: int, device: torch.device) -> torch.Tensor:
        """Flat positions of each block's window in the halo-padded map, (nh*nw*win*win,): a gather, not
        ``Tensor.unfold`` (the same values; an op Core ML and OpenVINO convert)."""
        b, r = self.block_size, torch.arange(self.win_size, device=device)
        rows, cols = torch.arange(nh, device=device)[:, None] * b + r, torch.arange(nw, device=device)[:, None] * b + r
        return (rows[:, None, :, None] * (nw * b + 2 * self.halo_size) + cols[None, :, None, :]).reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W, b, s = x.shape[2], x.shape[3], self.block_size, self.block_stride
        Hp, Wp = math.ceil(H / b) * b, math.ceil(W / b) * b
        out = self._attend(F.pad(x, (0, Wp - W, 0, Hp - H)), H, W)
        return self.pool(out[:, :, : math.ceil(H / s), : math.ceil(W / s)])

    def _attend(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Between the 1x1 convolutions: ``x`` (B, C, Hp, Wp), the (H, W) map size-padded -> (B, dim_out, Hp / s,
        Wp / s) (:mod:`vitkit.kernels` overrides this)."""
        B, _, Hp, Wp = x.shape
        b, h, bs, win = self.block_size, self.halo_size, self.block_size_ds, self.win_size
        nh, nw, heads, dqk, dv = Hp // b, Wp // b, self.num_heads, self.dim_head_qk, self.dim_head_v
        q = self.q(x).reshape(B * heads * dqk, nh, bs, nw, bs).transpose(2, 3)  # (rank <= 5 throughout: Core ML)
        # (B*heads, blocks, bs*bs, d), stored in that order: SDPA's fused CPU kernel needs unit stride on d
        q = q.reshape(B * heads, dqk, nh * nw, bs * bs).permute(0, 2, 3, 1).contiguous()
        # each head's kv channels are dqk of k then dv of v; windows of win x win at step b over the halo-padded map,
        # gathered as whole rows of a (B*heads, position, d) copy (a fraction of the cost of gathering columns)
        kv = F.pad(self.kv(x), (h, h, h, h)).reshape(B * heads, dqk + dv, -1).transpose(1, 2).contiguous()
        kv = kv.index_select(1, self._windows(nh, nw, x.device)).reshape(B * heads, nh * nw, win * win, dqk + dv)
        k, v = kv.split([dqk, dv], dim=-1)
        bias = self.pos_embed(q)  # from the unscaled query, as in the reference
        key_bias = self._key_bias(H, W, Hp, Wp, q)
        bias = bias if key_bias is None else bias + key_bias[:, None, :]
        if self.use_fused():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        else:
            out = self.attn_probs(((q @ k.transpose(-2, -1)) * self.scale + bias).softmax(dim=-1)) @ v
        out = out.permute(0, 3, 1, 2).reshape(B * heads * dv, nh, nw, bs, bs).transpose(2, 3)  # (out: B*heads, ...)
        return out.reshape(B, heads * dv, nh * bs, nw * bs)

    def attention_geometry(self, record: AttentionRecord, query: ImageQuery) -> torch.Tensor:
        """(B*heads, blocks, bs*bs, win*win) on the layer's (Hf, Wf) input map: the query's block window, the
        ``(b + 2h)^2`` map pixels around its ``b x b`` block. Keys in the zero padding outside the map carry
        probability but no pixel, so their mass is dropped (see :mod:`vitkit.interpret.geometry`)."""
        Hf, Wf = record.input_shape[-2:]
        b, h, s, bs, win = self.block_size, self.halo_size, self.block_stride, self.block_size_ds, self.win_size
        nh, nw, heads = math.ceil(Hf / b), math.ceil(Wf / b), self.num_heads
        fy, fx = query.cell((Hf, Wf))
        by, bx = fy // b, fx // b
        iy, ix = (fy - by * b) // s, (fx - bx * b) // s  # the query's (strided) position in its block
        p = record.probs.reshape(-1, heads, nh * nw, bs * bs, win, win)
        row = p[:, :, by * nw + bx, iy * bs + ix]  # (B, heads, win, win)
        cells = row.new_zeros(row.shape[0], heads, Hf, Wf)
        y0, x0 = by * b - h, bx * b - h  # window origin on the map; clip to the image
        ys, xs = slice(max(0, -y0), min(win, Hf - y0)), slice(max(0, -x0), min(win, Wf - x0))
        cells[:, :, y0 + ys.start : y0 + ys.stop, x0 + xs.start : x0 + xs.stop] = row[:, :, ys, xs]
        return cells
