"""Swin Transformer: "Hierarchical Vision Transformer using Shifted Windows" (Liu et al., ICCV 2021, arXiv 2103.14030).

Reference implementation for layouts and parameter names: timm ``swin_transformer.py`` (ARCHITECTURES.md §6), so
timm checkpoints load as they are (``checkpoint_filter`` also takes the original Microsoft layout). Written for
vitkit from the paper's equations; timm was read for layout, not copied.

* Patch embedding: a 4x4/4 conv + LayerNorm; stages 2-4 start with patch merging (each 2x2 group of tokens
  concatenated, LayerNorm over 4C, a bias-free Linear to 2C).
* Blocks alternate W-MSA (attention inside non-overlapping M x M windows) and SW-MSA (the map cyclically
  shifted by ``-M // 2`` before partitioning, and back after). After the shift, the last row and column of
  windows hold tokens from up to four sub-windows that are not neighbours in the image: pairs from different
  sub-windows get -100 added to their scores (the mask), so a window attends only inside its shifted window.
* Every window attention adds a relative position bias ``B[i, j] = table[index(p_i - p_j)]`` from a learned
  ``(2M - 1)^2 x heads`` table.
* A stage whose token grid is no larger than the window uses one window covering it, without shift (the paper's
  rule for small maps). Grids that are not a multiple of the window are zero-padded at the bottom/right after the
  shift, with the mask regions laid on the padded grid, exactly as timm does (so checkpoints give the same
  outputs at any input size; the padded tokens are attended as keys there, as in timm).
* ``forward_features`` returns the normalised NCHW map (timm returns NHWC); the head average-pools it.

Less attention (LaViT, :mod:`vitkit.layers.less_attention`) composed with Swin (``less_attention=True``; ours:
LaViT's paper says less attention works with other attention types, but how it was put on Swin is not known):
in each stage the first ``num_va[i]`` blocks compute window attention, the rest are LA blocks that transform the
scores (``QK^T / sqrt(d) + B``, before the mask) of the latest block with the same shift, so each LA block
maps a window's score matrix onto the same window partition and applies its own shift's mask after the
transform. The default ``num_va`` is the number of distinct shifts in each stage (2 where the stage shifts,
1 where its one window covers the map): the first W-MSA and SW-MSA blocks compute attention, later ones reuse
it. Nothing is carried across stages (patch merging changes the windows).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers import ClassifierHead, DropPath, Mlp, PatchEmbed, drop_path_schedule
from vitkit.layers.attention import Attention
from vitkit.layers.helpers import trunc_normal_linears_
from vitkit.layers.less_attention import LessAttention, dp_loss
from vitkit.models._base import ConvStagesModel, FeatureInfo, ModelArgError, VitkitModel, check_img_size
from vitkit.models._registry import PretrainedCfg, default_cfg, register_variant

if TYPE_CHECKING:  # the interpret side of attention_geometry (type only)
    from vitkit.interpret import AttentionRecord
    from vitkit.interpret.geometry import ImageQuery

MASK_VALUE = -100.0  # what timm adds to blocked pairs (the original code's value; exp(-100) underflows to ~0)


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """``[N, N]`` index into the bias table (N = window area, tokens in row-major order).

    Token i at ``(y_i, x_i)``: ``index = (y_i - y_j + Wh - 1) * (2 Ww - 1) + (x_i - x_j + Ww - 1)``, a bijection
    from the ``(2 Wh - 1)(2 Ww - 1)`` possible offsets onto the table rows.
    """
    wh, ww = window
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + wh - 1  # (N, N), in [0, 2 Wh - 2]
    dx = xs[:, None] - xs[None, :] + ww - 1
    return dy * (2 * ww - 1) + dx


def shifted_window_mask(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """``[num_windows, N, N]`` additive mask for attention in the windows of the cyclically shifted ``grid``.

    ``grid`` is the (padded) shifted map. Along each axis the last ``shift`` positions hold tokens wrapped round
    from the start of the map, the ``window - shift`` before them the end of the map, and the rest lie in whole
    windows: a pair of tokens may attend only when both axes put them in the same one of these regions.
    """
    labels = []
    for size, w, s in zip(grid, window, shift):
        pos = torch.arange(size)
        labels.append((pos >= size - w).long() + (pos >= size - s).long())  # region 0, 1 or 2 along the axis
    region = labels[0][:, None] * 3 + labels[1][None, :]  # (H, W)
    cells = window_partition(region[None, :, :, None], window).reshape(-1, window[0] * window[1])  # (nW, N)
    return (cells[:, :, None] != cells[:, None, :]).float() * MASK_VALUE  # (nW, N, N)


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B * num_windows, Wh, Ww, C]``, windows in row-major order within each image."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // window[0], window[0], W // window[1], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0], window[1], C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B * num_windows, Wh, Ww, C]`` -> ``[B, H, W, C]``."""
    H, W = grid
    C = windows.shape[-1]
    x = windows.reshape(-1, H // window[0], W // window[1], window[0], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def window_attention_geometry(module: nn.Module, record: AttentionRecord, query: ImageQuery) -> torch.Tensor:
    """(B * nW, heads, N, N) window attention as an ``attention_geometry`` (see :mod:`vitkit.interpret.geometry`):
    the query token's row placed on the stage's token grid, zeros outside its (shifted) window. ``module.layout``
    is the block's ``(grid, window, shift, padded grid)``; keys on padding fall outside the image and are dropped."""
    (H, W), (wh, ww), (sh, sw), (Hp, Wp) = module.layout
    qy, qx = query.cell((H, W))
    sy, sx = (qy - sh) % H, (qx - sw) % W  # where the cyclic shift moved the query token
    nw = (Hp // wh) * (Wp // ww)
    p = record.probs.reshape(-1, nw, *record.probs.shape[1:])  # (B, nW, heads, N, N)
    row = p[:, (sy // wh) * (Wp // ww) + sx // ww, :, (sy % wh) * ww + sx % ww, :]  # (B, heads, N)
    cells = row.new_zeros(row.shape[0], row.shape[1], Hp, Wp)
    y0, x0 = sy // wh * wh, sx // ww * ww
    cells[:, :, y0 : y0 + wh, x0 : x0 + ww] = row.reshape(*row.shape[:2], wh, ww)
    return torch.roll(cells[:, :, :H, :W], shifts=(sh, sw), dims=(2, 3))  # back to image positions


class WindowLessAttention(LessAttention):
    """:class:`~vitkit.layers.less_attention.LessAttention` on Swin windows: the same layer, with the window
    geometry for attention maps (its probabilities are per window, like :class:`WindowAttention`'s)."""

    attention_geometry = window_attention_geometry


class WindowAttention(nn.Module):
    """Multi-head attention inside each window, with a relative position bias (timm's parameter layout).

    ``forward(x, mask, keep_scores)`` on windows ``[B * nW, N, C]``; ``mask`` broadcasts to ``[B * nW, heads, N, N]``
    (or is None). With
    ``keep_scores`` the eager path runs and the unmasked scores ``QK^T / sqrt(d) + B`` come back too (for
    less-attention layers); otherwise the fused path runs when selected (see :mod:`vitkit.layers.attention`).
    """

    def __init__(
        self, dim: int, num_heads: int, window: tuple[int, int], qkv_bias: bool = True, attn_drop=0.0, proj_drop=0.0
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim, self.window = num_heads, dim // num_heads, window
        self.scale = self.head_dim**-0.5
        self.fused_attn: bool | None = None
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.attn_probs = nn.Identity()  # hook point: eager-path probabilities (B * nW, heads, N, N)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    use_fused = Attention.use_fused
    attention_geometry = window_attention_geometry

    def rel_pos_bias(self) -> torch.Tensor:
        """``[heads, N, N]``: the table row of each pair's offset."""
        n = self.relative_position_index.shape[0]
        return (
            self.relative_position_bias_table[self.relative_position_index.flatten()].reshape(n, n, -1).permute(2, 0, 1)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, keep_scores: bool = False):
        Bw, N, C = x.shape
        q, k, v = self.qkv(x).reshape(Bw, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.rel_pos_bias()[None]  # (1, heads, N, N)
        scores = None
        if self.use_fused() and not keep_scores:
            attn_mask = bias if mask is None else bias + mask
            p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, scale=self.scale)
        else:
            scores = (q * self.scale) @ k.transpose(-2, -1) + bias  # (B * nW, heads, N, N)
            probs = self.attn_probs((scores if mask is None else scores + mask).softmax(dim=-1))
            out = self.attn_drop(probs) @ v
        out = out.transpose(1, 2).reshape(Bw, N, C)
        return self.proj_drop(self.proj(out)), scores


class SwinBlock(nn.Module):
    """Pre-norm block on an NHWC map: (shifted) window attention or less attention, then an MLP."""

    def __init__(self, dim, num_heads, grid, window, shift, mlp_ratio, qkv_bias, drop, drop_path, less, la_kwargs):
        super().__init__()
        # a grid no larger than the window is one window, unshifted (timm's rule, from the paper)
        self.window = tuple(min(g, w) for g, w in zip(grid, window))
        self.shift = tuple(0 if g <= w else s for g, w, s in zip(grid, window, shift))
        self.padded = tuple(math.ceil(g / w) * w for g, w in zip(grid, self.window))
        self.less = less
        self.keep_scores = False  # set by the model when a later LA block reads this block's scores
        self.norm1 = nn.LayerNorm(dim)
        n = self.window[0] * self.window[1]
        if less:
            self.attn = WindowLessAttention(dim, num_heads, n, n, qkv_bias=qkv_bias, proj_drop=drop, **la_kwargs)
        else:
            self.attn = WindowAttention(dim, num_heads, self.window, qkv_bias, proj_drop=drop)
        self.attn.layout = (tuple(grid), self.window, self.shift, self.padded)  # for attention_geometry
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        mask = shifted_window_mask(self.padded, self.window, self.shift) if any(self.shift) else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None = None):
        """``x`` ``[B, H, W, C]``; ``prev``: the carried scores an LA block transforms. Returns x, scores, probs."""
        B, H, W, C = x.shape
        y = self.norm1(x)
        if any(self.shift):
            y = torch.roll(y, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        y = F.pad(y, (0, 0, 0, self.padded[1] - W, 0, self.padded[0] - H))  # timm pads after the shift
        windows = window_partition(y, self.window).reshape(-1, self.window[0] * self.window[1], C)  # (B * nW, N, C)
        # windows are batch-major (window w of image b is row b * nW + w): the mask repeats per image
        mask = None if self.attn_mask is None else self.attn_mask.repeat(B, 1, 1)[:, None]  # (B * nW, 1, N, N)
        if self.less:
            windows, scores, probs = self.attn(windows, self.window, prev, mask)
        else:
            windows, scores = self.attn(windows, mask, self.keep_scores)
            probs = None
        y = window_reverse(windows.reshape(-1, *self.window, C), self.window, self.padded)[:, :H, :W]
        if any(self.shift):
            y = torch.roll(y, shifts=self.shift, dims=(1, 2))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), scores, probs


class PatchMerging(nn.Module):
    """``[B, H, W, C]`` -> ``[B, H/2, W/2, out]``: each 2x2 group concatenated (timm's channel order), norm, Linear."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        # channel groups in the order (0,0), (1,0), (0,1), (1,1) as (row, col) offsets: the column offset is slower
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Patch merging (stages after the first), then blocks alternating unshifted and shifted windows."""

    def __init__(self, in_dim, dim, grid, depth, num_heads, window, num_va, mlp_ratio, qkv_bias, drop, dpr, la_kwargs):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim) if in_dim != dim else nn.Identity()
        shift = (window[0] // 2, window[1] // 2)
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                grid,
                window,
                (0, 0) if j % 2 == 0 else shift,
                mlp_ratio,
                qkv_bias,
                drop,
                dpr[j],
                j >= num_va,
                la_kwargs,
            )
            for j in range(depth)
        )
        self.source = []  # for each LA block, the block whose scores it transforms: the latest one with its shift
        for j, blk in enumerate(self.blocks):
            src = next((i for i in range(j - 1, -1, -1) if self.blocks[i].shift == blk.shift), None)
            if blk.less and src is None:
                raise ModelArgError(
                    "SwinTransformer",
                    f"num_va={num_va} leaves block {j} (shift {blk.shift}) a less-attention block with no earlier "
                    "block of the same shift to take its scores from: each stage needs a vanilla block per shift",
                )
            self.source.append(src if blk.less else None)
            if blk.less:
                self.blocks[src].keep_scores = True

    def forward(self, x: torch.Tensor, checkpointing: bool = False, record: list | None = None) -> torch.Tensor:
        x = self.downsample(x)
        scores = [None] * len(self.blocks)
        for j, blk in enumerate(self.blocks):
            prev = scores[self.source[j]] if self.source[j] is not None else None
            if checkpointing:
                x, scores[j], probs = torch.utils.checkpoint.checkpoint(blk, x, prev, use_reentrant=False)
            else:
                x, scores[j], probs = blk(x, prev)
            if record is not None and blk.less:
                record.append(probs)
        return x


class _PatchEmbedNorm(PatchEmbed):
    """Patch embedding conv + LayerNorm, NHWC out (timm's ``patch_embed.proj`` / ``patch_embed.norm``)."""

    def __init__(self, img_size, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__(img_size, patch_size, in_chans, embed_dim, flatten=False)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/p, W/p, C)


class SwinTransformer(VitkitModel):
    """Swin Transformer (timm's names and layout), optionally with LaViT's less attention in later blocks."""

    feature_stages = "layers"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int | tuple[int, int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        less_attention: bool = False,
        num_va: tuple[int, ...] | None = None,
        share_heads: bool = True,
        residual: bool = False,
        carry: str = "pre",
    ):
        """
        Args:
            img_size: the default (and only) input size; each side a multiple of ``patch_size * 2^(stages - 1)``.
            window_size: M (an int or (Mh, Mw)); a stage whose grid is no larger uses one window covering it.
            less_attention: make the later blocks of each stage LaViT less-attention blocks (see the module doc).
            num_va: with ``less_attention``, the window-attention blocks at the start of each stage (default: one
                per distinct shift in the stage).
            share_heads, residual, carry: less-attention options (see vitkit.layers.less_attention).
        """
        super().__init__()
        n = len(depths)
        if len(num_heads) != n:
            raise ModelArgError(
                type(self).__name__, f"num_heads needs one entry per stage ({n}), got {tuple(num_heads)}"
            )
        window = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
        self.input_multiple = patch_size * 2 ** (n - 1)
        self.img_size = check_img_size(self.name, img_size, self.input_multiple, "the patch size x 2^(stages - 1)")
        self.in_chans, self.num_classes, self.drop_rate = in_chans, num_classes, drop_rate
        dims = [embed_dim * 2**i for i in range(n)]
        self.num_features = dims[-1]
        grids = [(self.img_size[0] // patch_size // 2**i, self.img_size[1] // patch_size // 2**i) for i in range(n)]
        if less_attention and num_va is None:
            num_va = tuple(
                min(d, 1 if all(g <= w for g, w in zip(grid, window)) else 2) for d, grid in zip(depths, grids)
            )
        num_va = tuple(num_va) if less_attention else tuple(depths)
        if len(num_va) != n or any(v > d for v, d in zip(num_va, depths)):
            raise ModelArgError(
                type(self).__name__, f"num_va={num_va} needs one entry per stage, at most depths={tuple(depths)}"
            )
        self.num_va = num_va
        self.patch_embed = _PatchEmbedNorm(self.img_size, patch_size, in_chans, embed_dim)
        la_kwargs = dict(share_heads=share_heads, residual=residual, carry=carry)
        dpr = drop_path_schedule(drop_path_rate, sum(depths))
        layers, self.feature_info = [], FeatureInfo()
        for i in range(n):
            rates = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            in_dim = dims[i - 1] if i else dims[0]
            layers.append(SwinStage(in_dim, dims[i], grids[i], depths[i], num_heads[i], window, num_va[i], mlp_ratio,
                                    qkv_bias, drop_rate, rates, la_kwargs))  # fmt: skip
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"layers.{i}"))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        self.la_record: list[torch.Tensor] = []
        trunc_normal_linears_(self)

    get_classifier = ConvStagesModel.get_classifier
    reset_classifier = ConvStagesModel.reset_classifier
    forward_head = ConvStagesModel.forward_head

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    def _stages_input(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        self.check_input(x, (1, 1), self.img_size)
        self.la_record = []
        return self.patch_embed(x), None  # (B, H/4, W/4, C)

    def _stage_forward(self, i: int, x: torch.Tensor, ctx) -> torch.Tensor:
        record = self.la_record if self.training else None
        return self.layers[i](x, self.grad_checkpointing and self.training, record)

    def _stage_output(self, i: int, x: torch.Tensor, ctx, norm: bool, output_fmt: str) -> torch.Tensor:
        if norm and i == len(self.layers) - 1:
            x = self.norm(x)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)

    def _stages_final(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.norm(x).permute(0, 3, 1, 2)  # (B, C, H, W)

    def _prune_tail(self) -> None:
        self.norm = nn.Identity()  # features_only returns the stage outputs, which the final norm does not touch
        self.reset_classifier(0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, ctx = self._stages_input(x)
        for i in range(len(self.layers)):
            x = self._stage_forward(i, x, ctx)
        return self._stages_final(x, ctx)

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """{'dp': LaViT's Diagonality Preserving loss on the LA blocks' window attention} after a training forward."""
        return {"dp": dp_loss(self.la_record)} if self.la_record else {}


def checkpoint_filter(state_dict: dict, model: nn.Module) -> dict:
    """timm's layout as it is; the original Microsoft layout (``layers.i.downsample`` at the end of stage i, a bare
    ``head``) renamed to it. Non-persistent buffers (position index, mask) are dropped."""
    state_dict = state_dict.get("model", state_dict)
    old = "head.fc.weight" not in state_dict and "head.weight" in state_dict
    out = {}
    for k, v in state_dict.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        if old:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            k = re.sub(r"^head\.", "head.fc.", k)
        out[k] = v
    return out


# ---- variants [timm-code]; params/GMACs/top-1 in ARCHITECTURES.md §6 ----------------------------------------
_VARIANTS = {
    "swin_tiny_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base_patch4_window7_224": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}

for _name, _args in _VARIANTS.items():
    register_variant(
        _name,
        SwinTransformer,
        dict(patch_size=4, window_size=7, **_args),
        family="swin",
        cfg=default_cfg(first_conv="patch_embed.proj", classifier="head.fc", test_input_size=(3, 32, 32)),
        pretrained=[PretrainedCfg(tag="ms_in1k", hf_hub_id=f"timm/{_name}.ms_in1k", license="mit")],
        checkpoint_filter=checkpoint_filter,
    )
