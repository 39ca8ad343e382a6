"""Blocked local self-attention with halos (HaloNet, Vaswani et al., CVPR 2021, arXiv 2103.12731).

The map is split into non-overlapping ``b x b`` query blocks; each block attends to the ``(b + 2h)^2`` window
around it (its block plus a halo of ``h`` pixels). Logits are ``q.k * d^-0.5`` plus factorised 2-D relative
position logits ``q.r_h[dy] + q.r_w[dx]`` (tables ``height_rel``/``width_rel`` of ``2 * win - 1`` rows).
A stride-``s`` layer computes queries at stride ``s`` (``b/s x b/s`` outputs per block) from the
full-resolution window. Parameter names and the relative-index convention follow timm's ``HaloAttn``
(row index ``key_pos - query_pos + win - 1``, with the query position counted in the strided block), so
timm checkpoints load and give the same outputs.

Padding rule (any input size):
* the map is zero-padded on the bottom/right to a multiple of ``b`` ("size padding") and by ``h`` on every
  side (the halo);
* ``mask_padding="size"`` (default, the reference's numerics): keys in the size padding are masked out of
  the softmax; halo keys beyond the image border are zeros that take part, exactly as in the reference, so a
  map whose sides are multiples of ``b`` gives the reference's result;
* ``mask_padding="all"``: every key outside the image is masked, so the layer equals full attention over
  the map restricted to each block's window (the naive reference in the tests);
* query rows/columns in the size padding are computed and cropped away.

The attention runs explicitly, in the reference's operation order ``softmax((q k^T) * scale + rel)``, with the
probabilities exposed at ``attn_probs`` (eager path, the default), or through
``F.scaled_dot_product_attention`` with the relative logits and the mask as an additive bias (fused path,
``layer.fused_attn = True``). The two agree to rounding, but deep HaloNets with large activations amplify
rounding differences (``halonet_h1`` with the golden fixture's weights: fp32 vs fp64 of the same network differ
by 43%), so only the reference's operation order reproduces reference outputs; that is why the eager path is
the default here, unlike the other attention layers. In fp32 the eager path keeps the reference's products and
roundings exactly (in place at inference, through :class:`_Attend` while training); bf16 has no reference to
match and takes faster arithmetic (GEMM projections at inference, the scale inside the relative-logit GEMM),
within bf16 rounding of fp32.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.attention import fused_attn
from vitkit.layers.conv_bn import make_divisible
from vitkit.layers.helpers import hooked, tracing

if TYPE_CHECKING:  # the interpret side of attention_geometry (type only)
    from vitkit.interpret import AttentionRecord
    from vitkit.interpret.geometry import ImageQuery

_MASKS = ("size", "all")
_CHUNK_LOGITS = 1 << 21  # logits per chunk of blocks in the eager path (8 MiB in fp32): stays in cache


class PosEmbedRel(nn.Module):
    """Factorised relative position logits for a ``block x block`` query block over a ``win x win`` window."""

    def __init__(self, block_size: int, win_size: int, dim_head: int, scale: float):
        super().__init__()
        self.block_size, self.win_size = block_size, win_size
        self.height_rel = nn.Parameter(torch.randn(win_size * 2 - 1, dim_head) * scale)
        self.width_rel = nn.Parameter(torch.randn(win_size * 2 - 1, dim_head) * scale)
        # (2*win, win*win) 0/1 matrix: [rh | rw] @ spread is rh[ky] + rw[kx] at column ky*win + kx (not saved)
        spread = torch.zeros(2 * win_size, win_size, win_size)
        for k in range(win_size):
            spread[k, k, :] = spread[win_size + k, :, k] = 1
        self.register_buffer("spread", spread.reshape(2 * win_size, -1), persistent=False)

    def rows(self, q: torch.Tensor) -> torch.Tensor:
        """``q``: (B, blocks, bs*bs, d) -> per-axis logits (B, blocks, bs*bs, 2*win): ``[rh(ky) | rw(kx)]``.

        One product with both tables, ``p = q @ [height_rel; width_rel]^T`` (B, blocks, y, x, 2R); the logit of
        query row ``y`` for key row ``ky`` is column ``ky - y + win - 1``: a skewed view of ``p`` (row stride one
        less than ``p``'s), so no index gather is needed (:class:`_SkewedRows`). Same products as the reference.
        """
        B, NB, _, d = q.shape
        table = torch.cat([self.height_rel, self.width_rel]).to(q.dtype)
        p = q.reshape(B, NB, self.block_size, self.block_size, d) @ table.t()  # (B, NB, y, x, 2R)
        return _SkewedRows.apply(p, self.win_size)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """``q``: (B, blocks, bs*bs, d) -> relative logits (B, blocks, bs*bs, win*win), ``rh[ky] + rw[kx]``.

        The broadcast sum is the product ``rows(q) @ spread``: each output has exactly two non-zero terms, so it
        is ``rh + rw`` rounded once, bitwise the reference's sum, and a GEMM instead of a strided broadcast add
        (0.9 ms of 1.0 at halonet26t's 256-channel 16x16 layer, batch 8).
        """
        return self.rows(q) @ self.spread.to(q.dtype)


def _skewed(p: torch.Tensor, win: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (B, NB, y, x, win) of ``p`` (B, NB, y, x, 2R): column ``k - y + win - 1`` of row (y, x) of the
    height half, and ``k - x + win - 1`` of the width half. Each view addresses distinct elements."""
    B, NB, bs, _, _ = p.shape
    s0, s1, sy, sx, _ = p.stride()
    size, off = (B, NB, bs, bs, win), p.storage_offset() + win - 1
    rh = p.as_strided(size, (s0, s1, sy - 1, sx, 1), off)  # (B, NB, y, x, ky)
    rw = p.as_strided(size, (s0, s1, sy, sx - 1, 1), off + 2 * win - 1)  # (B, NB, y, x, kx)
    return rh, rw


class _SkewedRows(torch.autograd.Function):
    """(B, NB, y, x, 2R) per-table logits -> (B, NB, y*x, 2*win) ``[rh | rw]`` read through skewed views.

    Backward: the two halves written back through the same views with two strided copies (the views are
    injective), instead of the generic ``as_strided`` backward, which scatters through a storage-sized buffer.
    """

    @staticmethod
    def forward(ctx, p, win):
        ctx.meta = (p.shape, p.stride(), win)
        B, NB, bs, _, _ = p.shape
        return torch.cat(_skewed(p, win), dim=-1).view(B, NB, bs * bs, 2 * win)

    @staticmethod
    def backward(ctx, g):
        shape, stride, win = ctx.meta
        B, NB, bs, _, _ = shape
        g = g.reshape(B, NB, bs, bs, 2 * win)
        gp = g.new_zeros(shape).as_strided(shape, stride)  # the layout the forward's views were taken on
        gh, gw = _skewed(gp, win)
        gh.copy_(g[..., :win])
        gw.copy_(g[..., win:])
        return gp, None


def _chunks(win: int, step: int) -> list[tuple[int, int]]:
    """``[0, win)`` cut into pieces no longer than ``step``."""
    return [(a, min(a + step, win)) for a in range(0, win, step)]


def _windows(m: torch.Tensor, n: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int], step: int):
    """(B, G, D, Hp, Wp) -> view (B, G, nh, nw, D, rows, cols): rows ``i * step + [r0, r1)`` of block row ``i``."""
    sB, sG, sD, sH, sW = m.stride()
    (r0, r1), (c0, c1) = rows, cols
    return m.as_strided(
        (m.shape[0], m.shape[1], n[0], n[1], m.shape[2], r1 - r0, c1 - c0),
        (sB, sG, step * sH, step * sW, sD, sH, sW),
        m.storage_offset() + r0 * sH + c0 * sW,
    )


def _segments(n: int, b: int, h: int) -> list[tuple[slice, slice, int, slice]]:
    """One axis of a window (``b + 2h`` long, at step ``b``) in map coordinates, for ``h <= b``: the top halo
    (window rows ``[0, h)``) is the bottom of the previous block, the core is the block itself, the bottom halo
    the top of the next block. Entries: (window rows, source blocks, target block offset, target rows)."""
    core = (slice(h, h + b), slice(0, n), 0, slice(0, b))
    if h == 0 or n == 1:
        return [core]
    return [
        core,
        (slice(0, h), slice(1, n), -1, slice(b - h, b)),
        (slice(h + b, b + 2 * h), slice(0, n - 1), 1, slice(0, h)),
    ]


class _GatherWindows(torch.autograd.Function):
    """The overlapping ``win x win`` windows at step ``b`` of a (B, G*D, H, W) map zero-padded by the halo ``h``
    on every side, group- and block-major, split along D at ``split``: two contiguous tensors
    (B, G, nh, nw, D_i, win, win) (keys and values).

    Forward: pad, then one strided copy per part (runs of ``win`` contiguous pixels); a one-block map is copied
    into a zeroed frame per part instead (no padded copy: halonet26t's 8x8 kv map, 0.63 -> 0.37 ms). Backward,
    for ``h <= b``, straight into the unpadded map's gradient, one axis at a time: along each axis the windows'
    cores tile the map (one strided copy, no zero fill) and the two halos are one strided add each over the blocks
    that have that neighbour; rows first (runs of ``win`` pixels), then columns. (Nine 2-D pieces at once measured 1.9x
    slower at 16x16: the column halos are 2-pixel runs in every piece.) Larger halos add ``ceil(win / b)^2``
    pieces into a zeroed padded buffer and crop it. (``Tensor.unfold``'s backward copies per window offset, and
    slicing one gathered tensor in two would zero-fill a full-size gradient per slice.)
    """

    @staticmethod
    def forward(ctx, m, groups, n, win, step, split):
        h = (win - step) // 2
        B, C, H, W = m.shape
        shape = (B, groups, C // groups, H, W)
        ctx.meta = (shape, n, win, step, split)
        if n == (1, 1) and H == W == step:  # one block: each part is the map in a zeroed frame, one copy each
            mv = m.view(shape)
            parts = (mv[:, :, :split], mv[:, :, split:])
            outs = [m.new_zeros(B, groups, 1, 1, p.shape[2], win, win) for p in parts]
            for o, p in zip(outs, parts):
                o[:, :, 0, 0, :, h : h + H, h : h + W].copy_(p)
            return tuple(outs)
        padded = F.pad(m, (h, h, h, h)).reshape(B, groups, C // groups, H + 2 * h, W + 2 * h)
        view = _windows(padded, n, (0, win), (0, win), step)
        return view[:, :, :, :, :split].contiguous(), view[:, :, :, :, split:].contiguous()

    @staticmethod
    def backward(ctx, gk, gv):
        shape, n, win, step, split = ctx.meta
        h = (win - step) // 2
        parts = [(g, slice(0, split) if i == 0 else slice(split, None)) for i, g in enumerate((gk, gv))]
        parts = [(g, d) for g, d in parts if g is not None]
        if h > step:
            gm = parts[0][0].new_zeros(shape[:3] + (shape[3] + 2 * h, shape[4] + 2 * h))
            for rows in _chunks(win, step):
                for cols in _chunks(win, step):
                    view = _windows(gm, n, rows, cols, step)
                    for g, d in parts:
                        view[:, :, :, :, d].add_(g[..., slice(*rows), slice(*cols)])
            gm = gm[..., h : h + shape[3], h : h + shape[4]]
            return gm.reshape(shape[0], -1, shape[3], shape[4]), None, None, None, None, None
        # rows first: T (B, G, D, H, nw, win) holds, for every map row, the window columns of each block column
        B, G, D, H, W = shape
        t = parts[0][0].new_empty(B, G, D, H, n[1], win)
        if len(parts) == 1:  # one part has no gradient: its channels are zero
            t[:, :, slice(split, None) if parts[0][1].start == 0 else slice(0, split)].zero_()
        sB, sG, sD, sH, sJ, sC = t.stride()
        for i, (wr, br, bo, tr) in enumerate(_segments(n[0], step, h)):
            first, count = br.start + bo, br.stop - br.start
            size, stride = (B, G, count, tr.stop - tr.start, D, n[1], win), (sB, sG, step * sH, sH, sD, sJ, sC)
            view = t.as_strided(size, stride, t.storage_offset() + (first * step + tr.start) * sH)
            for g, d in parts:
                src = g[:, :, br, :, :, wr].permute(0, 1, 2, 5, 4, 3, 6)  # (B, G, blocks, rows, D, nw, win)
                view[:, :, :, :, d].copy_(src) if i == 0 else view[:, :, :, :, d].add_(src)
        # then columns, into the map's gradient
        gm = t.new_empty(shape)
        mB, mG, mD, mH, mW = gm.stride()
        for j, (wc, bc, co, tc) in enumerate(_segments(n[1], step, h)):
            first, count = bc.start + co, bc.stop - bc.start
            size, stride = (B, G, D, H, count, tc.stop - tc.start), (mB, mG, mD, mH, step * mW, mW)
            view = gm.as_strided(size, stride, gm.storage_offset() + (first * step + tc.start) * mW)
            view.copy_(t[..., bc, wc]) if j == 0 else view.add_(t[..., bc, wc])
        return gm.view(B, -1, H, W), None, None, None, None, None


def _probabilities(q, kT, rows, spread, scale, key_bias, inplace: bool) -> torch.Tensor:
    """``softmax((q k^T) * scale + rows @ spread + key_bias)`` over the last axis, rounded as the reference:
    the scaled logits plus ``rh + rw`` (the GEMM onto the logits adds their sum, rounded once), then the mask
    (0 or the dtype's minimum). ``inplace``: every step after the first product writes into its output."""
    attn = q @ kT
    n, rows, spread = attn.shape[-1], rows.reshape(-1, rows.shape[-1]), spread.to(attn.dtype)
    if inplace:
        if attn.dtype == torch.bfloat16:  # no reference roundings to keep in bf16: the scale inside the GEMM's sum
            attn.view(-1, n).addmm_(rows, spread, beta=scale)
        else:
            attn.mul_(scale).view(-1, n).addmm_(rows, spread)
        if key_bias is not None:
            attn.add_(key_bias[:, None, :])
        return torch.ops.aten._softmax.out(attn, -1, False, out=attn)
    # out of place: autograd's backward of an in-place op on a view copies the whole gradient
    attn = torch.addmm(attn.mul_(scale).view(-1, n), rows, spread).view(attn.shape)
    return (attn if key_bias is None else attn + key_bias[:, None, :]).softmax(dim=-1)


class _Attend(torch.autograd.Function):
    """``_probabilities(...) @ vT^T`` computed in place, with a hand-written backward that keeps only the
    probabilities: the scale is applied to the two small query/key gradients instead of the logits-sized one,
    and the relative rows' gradient is one GEMM with ``spread^T`` (the per-axis sums)."""

    @staticmethod
    def forward(ctx, q, kT, vT, rows, spread, scale, key_bias):
        p = _probabilities(q, kT, rows, spread, scale, key_bias, inplace=True)
        ctx.save_for_backward(q, kT, vT, p, spread)
        ctx.scale, ctx.rows_shape = scale, rows.shape
        return p @ vT.transpose(-2, -1)

    @staticmethod
    def backward(ctx, g):
        q, kT, vT, p, spread = ctx.saved_tensors
        need_q, need_k, need_v, need_rows = ctx.needs_input_grad[:4]
        gq = gk = gv = grows = None
        if need_q or need_k or need_rows:
            gl = g @ vT  # d loss / d probabilities, then in place d loss / d logits (one logits-sized buffer)
            gl = torch.ops.aten._softmax_backward_data.out(gl, p, -1, p.dtype, grad_input=gl)
            if need_q:
                gq = (gl @ kT.transpose(-2, -1)).mul_(ctx.scale)
            if need_k:
                gk = (q.transpose(-2, -1) @ gl).mul_(ctx.scale)
            if need_rows:
                grows = (gl.view(-1, gl.shape[-1]) @ spread.to(gl.dtype).t()).view(ctx.rows_shape)
            del gl  # before the value gradient: the two are never alive together
        if need_v:
            gv = g.transpose(-2, -1) @ p
        return gq, gk, gv, grows, None, None, None


def _bf16_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is about to be computed in bf16 on the CPU (bf16 input, or CPU autocast to bf16)."""
    if x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        get = getattr(torch, "get_autocast_dtype", None)  # torch >= 2.4; older: get_autocast_cpu_dtype
        return (get("cpu") if get else torch.get_autocast_cpu_dtype()) == torch.bfloat16
    return x.dtype == torch.bfloat16


def _project(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The 1x1 (strided) projection ``conv(x)``; bf16 inference on the CPU as one batched GEMM on the NCHW map.

    oneDNN's bf16 1x1 convolution on an NCHW map runs at a fraction of the GEMM rate (halonet26t's kv projection,
    256 -> 512 channels on 8x16x16: 1.37 ms against 0.31 ms as ``W @ x``), so bf16 takes the product; same
    products, accumulated in fp32 either way. fp32 keeps the convolution: the GEMM sums in another order at some
    shapes, and the reference parity of deep HaloNets needs the reference's roundings (see the module docstring).
    """
    recording = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
    if recording or not _bf16_cpu(x) or hooked(conv) or not x.is_contiguous():
        return conv(x)  # training too: the GEMM's weight gradient would be a per-image sum (a batch of weights)
    s = conv.stride[0]
    xs = x if s == 1 else x[:, :, ::s, ::s]
    B, C, H, W = xs.shape
    weight, maps = conv.weight.flatten(1).to(torch.bfloat16), xs.reshape(B, C, H * W).to(torch.bfloat16)
    if C > H * W and not tracing():  # (a traced loop would fix the batch size)
        # weight larger than an image's map: one product per image. The batched product packs the weight once per
        # image in scratch memory (512 -> 1024 channels on 8x8x8: 8.9 MB resident against 1.1 MB) and was slower
        y = maps.new_empty(B, weight.shape[0], H * W)
        for i in range(B):
            torch.mm(weight, maps[i], out=y[i])
    else:
        y = torch.matmul(weight, maps)
    if conv.bias is not None:
        y = y + conv.bias.to(y.dtype)[:, None]
    return y.view(B, -1, H, W)


class HaloAttention(nn.Module):
    """Multi-head halo attention on NCHW maps (no output projection: the block's next 1x1 conv is one).

    Args:
        dim: input channels.
        dim_out: output (value) channels; defaults to ``dim``.
        stride: 1, or 2 for attention downsampling (strided queries; 2x2 average pooling when ``b % s != 0``
            or ``avg_down``).
        num_heads: heads; value head width is ``dim_out // num_heads``.
        dim_head: query/key head width; default ``make_divisible(dim_out * qk_ratio, 8) // num_heads``.
        block_size: query block side ``b``.
        halo_size: halo ``h``.
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
        self.block_stride = 1
        use_pool = False
        if stride > 1:
            use_pool = avg_down or block_size % stride != 0
            self.block_stride = 1 if use_pool else stride
            self.block_size_ds = block_size // self.block_stride
        self.fused_attn: bool | None = False  # see the module docstring: reference numerics need the eager order
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
        if self.fused_attn is None:
            return fused_attn()
        # the process-wide switch can only turn the fused path off (analysis tools), never on
        return self.fused_attn and fused_attn()

    def _key_bias(self, H: int, W: int, Hp: int, Wp: int, ref: torch.Tensor) -> torch.Tensor | None:
        """Additive bias (blocks, win*win): 0 for valid keys, a large negative for masked ones."""
        h, b, win = self.halo_size, self.block_size, self.win_size
        valid = torch.ones(Hp + 2 * h, Wp + 2 * h, dtype=torch.bool, device=ref.device)
        if self.mask_padding == "all":
            valid[:h] = valid[h + H :] = False
            valid[:, :h] = valid[:, h + W :] = False
        elif (H, W) != (Hp, Wp):
            valid[h + H : h + Hp] = False
            valid[:, h + W : h + Wp] = False
        else:
            return None
        windows = valid.unfold(0, win, b).unfold(1, win, b)  # (nh, nw, win, win)
        bias = torch.zeros(windows.shape, dtype=ref.dtype, device=ref.device)
        bias.masked_fill_(~windows, torch.finfo(ref.dtype).min)
        return bias.reshape(-1, win * win)

    def _eager(self, q, kT, vT, key_bias) -> torch.Tensor:
        """The reference's operation order, ``softmax((q k^T) * scale + rel) v``, over chunks of blocks.

        ``q`` (B*heads, blocks, bs*bs, dqk), ``kT``/``vT`` (B*heads, blocks, d, win*win). The logits of a large
        map do not fit in cache (halonet_h1 at 1024 px: 400 MB for its first stage), so they are computed in
        chunks of about ``_CHUNK_LOGITS`` (blocks first, then rows of B*heads); every block is computed exactly
        as in one pass (same products, same sums). One pass while anything observes ``attn_probs``
        (:func:`vitkit.interpret.capture_attention`), so the probabilities arrive whole, and under tracing,
        export and torch.compile. While autograd records, chunks are 8x larger (see below).
        """
        nb, bs2 = q.shape[1:3]
        per_block = bs2 * kT.shape[-1]
        # While autograd records, chunks are 8x larger: every chunk's probabilities are kept for the backward
        # anyway, so small chunks save little memory, and the backward through them (smaller products, the split
        # of the concatenated output) measured slower: halonet26t's 256-channel 16x16 layer at batch 8, fwd+bwd
        # 37.4 ms in 8 MiB chunks, 33.9 ms in one pass. The chunks still bound the temporaries of large maps.
        recording = self._recording(q, kT, vT)
        limit = _CHUNK_LOGITS * (8 if recording else 1)
        step_b = max(1, min(nb, limit // per_block))  # blocks per chunk, then rows of B*heads per chunk
        step_r = max(1, limit // (per_block * step_b))
        # equal chunks (64 rows in 8 MiB chunks: 32 + 32, not 56 + 8: a small last chunk runs at a poor rate)
        step_b = math.ceil(nb / math.ceil(nb / step_b))
        step_r = math.ceil(q.shape[0] / math.ceil(q.shape[0] / step_r))
        # traced/compiled graphs get one pass: a Python loop over the batch would fix the batch size in them
        if hooked(self.attn_probs) or tracing() or (step_b == nb and q.shape[0] <= step_r):
            return self._attend(q, kT, vT, key_bias)
        # at inference every chunk writes its slab of the output in place (a chunk spans all blocks or one row, so
        # its slab is contiguous); while recording, autograd needs the chunks as outputs and they are concatenated
        out = None if recording or q.dtype != vT.dtype else vT.new_empty(q.shape[:3] + (vT.shape[2],))
        rows = []
        for i in range(0, q.shape[0], step_r):
            r = slice(i, i + step_r)
            cols = []
            for j in range(0, nb, step_b):
                b = slice(j, j + step_b)
                bias = None if key_bias is None else key_bias[b]
                cols.append(self._attend(q[r, b], kT[r, b], vT[r, b], bias, None if out is None else out[r, b]))
            if out is None:
                rows.append(cols[0] if len(cols) == 1 else torch.cat(cols, dim=1))
        return out if out is not None else torch.cat(rows)

    def _recording(self, q, kT, vT) -> bool:
        """Whether autograd records the attention: its inputs or the relative-position tables need gradients (one
        answer for the chunking and the path, so a chunk never writes in place what autograd must see)."""
        tables = (self.pos_embed.height_rel, self.pos_embed.width_rel)
        return torch.is_grad_enabled() and any(t.requires_grad for t in (q, kT, vT, *tables))

    def _logit_bias(self, q, key_bias) -> torch.Tensor:
        """Relative logits (from the unscaled query, as in the reference) plus the padding mask, if any."""
        bias = self.pos_embed(q)
        return bias if key_bias is None else bias + key_bias[:, None, :]

    def _attend(self, q, kT, vT, key_bias, out: torch.Tensor | None = None) -> torch.Tensor:
        """``softmax((q k^T) * scale + rel) v`` with the reference's roundings (see :func:`_probabilities`).

        At inference everything after the first product runs in place; while autograd records, through
        :class:`_Attend` (in place too, with a hand-written backward), or, while something observes the
        probabilities, through autograd's own ops so that hooks see (and may replace) them.
        """
        if tracing():  # same values out of place: TorchScript's oneDNN Graph fuser mis-types the in-place pair
            attn = ((q @ kT) * self.scale + self._logit_bias(q, key_bias)).softmax(dim=-1)
            return self.attn_probs(attn) @ vT.transpose(-2, -1)
        rows = self.pos_embed.rows(q)
        recording = self._recording(q, kT, vT)
        if recording and not hooked(self.attn_probs):
            return _Attend.apply(q, kT, vT, rows, self.pos_embed.spread, self.scale, key_bias)
        attn = _probabilities(q, kT, rows, self.pos_embed.spread, self.scale, key_bias, inplace=not recording)
        attn = self.attn_probs(attn)
        if out is not None:  # a contiguous slab of the caller's output (inference only)
            return torch.matmul(attn, vT.transpose(-2, -1), out=out)
        return attn @ vT.transpose(-2, -1)  # (rows, blocks, bs*bs, dv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        b, s, bs, win = self.block_size, self.block_stride, self.block_size_ds, self.win_size
        Hp, Wp = math.ceil(H / b) * b, math.ceil(W / b) * b
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, Wp - W, 0, Hp - H))
        nh, nw = Hp // b, Wp // b
        nb, heads, dqk, dv = nh * nw, self.num_heads, self.dim_head_qk, self.dim_head_v

        q = _project(self.q, x).reshape(B * heads, dqk, nh, bs, nw, bs)
        # (B*heads, blocks, bs*bs, dqk); contiguous: a one-block map gives a transposed view, which made the
        # relative-logit product 2.7x slower (halonet26t 512 ch 8x8, bf16: 0.8 -> 0.3 ms)
        q = q.permute(0, 2, 4, 3, 5, 1).reshape(B * heads, nb, bs * bs, dqk).contiguous()

        # key/value windows, channel-major: (B*heads, blocks, dqk + dv, win*win); each channel's window rows are
        # contiguous runs in the NCHW map, and k^T / v^T are the two halves along the channel axis
        # each head's channels of the kv map: dqk of k, then dv of v
        kT, vT = _GatherWindows.apply(_project(self.kv, x), heads, (nh, nw), win, b, dqk)
        kT, vT = kT.view(B * heads, nb, dqk, win * win), vT.view(B * heads, nb, dv, win * win)

        key_bias = self._key_bias(H, W, Hp, Wp, q)
        if self.use_fused():
            k, v = kT.transpose(-2, -1), vT.transpose(-2, -1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._logit_bias(q, key_bias), scale=self.scale)
        else:
            out = self._eager(q, kT, vT, key_bias)

        out = out.reshape(B, heads, nh, nw, bs, bs, dv).permute(0, 1, 6, 2, 4, 3, 5)
        out = out.reshape(B, heads * dv, nh * bs, nw * bs)
        out = out[:, :, : math.ceil(H / s), : math.ceil(W / s)]
        return self.pool(out)

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
