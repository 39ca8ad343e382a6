"""NesT: Nested Hierarchical Transformer.

Paper: Zhang et al., "Nested Hierarchical Transformer: Towards Accurate, Data-Efficient and Interpretable
Visual Understanding", AAAI 2022 (arXiv 2105.12723). Official code: google-research/nested-transformer
(JAX). Reference implementation for parameter layout and numerics: timm ``nest.py`` (the ``*_jx`` variants
use TF-'SAME' padding to match the converted JAX weights); see ARCHITECTURES.md §5.

Structure: patch embedding -> levels. Each level adds a per-block position embedding
``(1, blocks, tokens, dim)`` and runs Transformer layers inside every block independently (local attention,
shared weights); between levels, *block aggregation* (3x3 conv, LayerNorm over channels, 3x3/2 max-pool)
works on the image plane, so 2x2 neighbouring blocks merge into one parent. Final LayerNorm, mean pool, head.

Beyond the reference (which asserts a fixed square input): blocks may be rectangular, so any
``img_size=(H, W)`` whose token grid divides into ``2^(levels-1)`` blocks per side works; loading a checkpoint
made for another block size resamples each block's position embedding (bicubic, antialiased). Rule: H and W
must be multiples of ``patch_size * 2^(num_levels-1)``; anything else gets a ValueError naming the multiple.

CIFAR variants (``nest_*_cifar``): pixel tokens, 4x4-token blocks, 4 levels, constant width and multi-query
attention as in the official ``nest_{tiny,small,base}_s16_32`` configs (§5.3). No timm reference exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers import (
    Attention,
    Block,
    Conv2dSame,
    LayerNorm2d,
    MaxPool2dSame,
    MultiQueryAttention,
    PatchEmbed,
    drop_path_schedule,
)
from vitkit.layers.attention import attend
from vitkit.layers.block import LayerNormEps6
from vitkit.models._base import FeatureInfo, VitkitModel, check_img_size, run_blocks
from vitkit.models._registry import PretrainedCfg, default_cfg, register_variant

if TYPE_CHECKING:
    from vitkit.interpret import AttentionRecord
    from vitkit.interpret.geometry import ImageQuery

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def blockify(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, T, N, C)``: blocks row-major over the grid, tokens row-major in a block."""
    B, H, W, C = x.shape
    gh, gw = H // block[0], W // block[1]
    x = x.reshape(B, gh, block[0], gw, block[1], C).transpose(2, 3)  # (B, gh, gw, bh, bw, C)
    return x.reshape(B, gh * gw, block[0] * block[1], C)


def unblockify(x: torch.Tensor, grid: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Exact inverse of :func:`blockify`: ``(B, T, N, C)`` -> ``(B, H, W, C)``."""
    B, _, _, C = x.shape
    x = x.reshape(B, grid[0], grid[1], block[0], block[1], C).transpose(2, 3)  # (B, gh, bh, gw, bw, C)
    return x.reshape(B, grid[0] * block[0], grid[1] * block[1], C)


class NestAttention(Attention):
    """Multi-head attention whose head outputs are concatenated channel-major: ``(B, N, head_dim, heads)``.

    The official JAX code (and timm's port of its weights) flattens the attention output as (head_dim, heads)
    rather than the usual (heads, head_dim); the output projection's weights depend on that order, so the
    converted ImageNet checkpoints only reproduce their outputs with it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        heads, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        x = attend(q, k, v, self.scale, self.attn_drop, self.attn_probs, self.use_fused())
        return self.proj_drop(self.proj(x.permute(0, 2, 3, 1).reshape(B, N, C)))  # (B, N, head_dim, heads)


class BlockAggregation(nn.Module):
    """3x3 conv -> LayerNorm over channels -> 3x3 max-pool stride 2, on the image plane (NesT §3.2).

    Parameter names follow timm's ``ConvPool`` (``conv``, ``norm``).
    """

    def __init__(self, in_dim: int, out_dim: int, pad_type: str = ""):
        super().__init__()
        if pad_type == "same":  # TF 'SAME': max-pool pads right/bottom only on even inputs
            self.conv = Conv2dSame(in_dim, out_dim, 3)
            self.pool = MaxPool2dSame(3, 2)
        else:
            self.conv = nn.Conv2d(in_dim, out_dim, 3, padding=1)
            self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.norm = LayerNorm2d(out_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.norm(self.conv(x)))  # (B, C', H/2, W/2)


class NestLevel(nn.Module):
    """One hierarchy level: (aggregation) -> blockify -> +pos-embed -> local Transformer layers -> unblockify."""

    def __init__(
        self,
        grid: tuple[int, int],
        block: tuple[int, int],
        dim: int,
        prev_dim: int | None,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_rate: float,
        attn_drop_rate: float,
        drop_path_rates: list[float],
        pad_type: str,
        attn_layer: type[nn.Module],
    ):
        super().__init__()
        self.grid, self.block = grid, block
        self.grad_checkpointing = False
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], block[0] * block[1], dim))
        self.pool = BlockAggregation(prev_dim, dim, pad_type) if prev_dim is not None else nn.Identity()
        self.transformer_encoder = nn.Sequential(
            *[
                Block(
                    dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    drop_path_rates[i],
                    norm_layer=LayerNormEps6,
                    attn_layer=attn_layer,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = blockify(x, self.block) + self.pos_embed  # (B, T, N, C)
        B, T, N, C = x.shape
        # every block is an independent sequence: fold blocks into the batch for the shared Transformer
        x = run_blocks(self.transformer_encoder, x.reshape(B * T, N, C), self.grad_checkpointing and self.training)
        x = unblockify(x.reshape(B, T, N, C), self.grid, self.block)  # (B, H, W, C)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)

    def attention_geometry(self, record: AttentionRecord, query: ImageQuery) -> torch.Tensor:
        """Local attention (B*T, heads, N, N) in each of the T blocks: the query sees its own block only; tokens
        of level ``l`` cover ``patch_size * 2^l`` pixels (see :mod:`vitkit.interpret.geometry`)."""
        (gh, gw), (bh, bw) = self.grid, self.block
        grid = (gh * bh, gw * bw)
        qy, qx = query.cell(grid)
        t, i = (qy // bh) * gw + qx // bw, (qy % bh) * bw + qx % bw  # the query's block and its token in it
        p = record.probs.reshape(-1, gh * gw, *record.probs.shape[1:])  # (B, T, heads, N, N)
        row = p[:, t, :, i, :].reshape(p.shape[0], p.shape[2], bh, bw)  # (B, heads, bh, bw)
        cells = row.new_zeros(row.shape[0], row.shape[1], *grid)
        y0, x0 = (qy // bh) * bh, (qx // bw) * bw
        cells[:, :, y0 : y0 + bh, x0 : x0 + bw] = row
        return cells


class NestLevelsMixin:
    """What the classifier (:class:`Nest`) and the generator (:class:`vitkit.models.nest_gen.NestGenerator`) share
    over their ``levels`` of :class:`NestLevel`: the initialisation, and the position embeddings kept out of weight
    decay. Mixed into an ``nn.Module`` that sets ``self.levels``."""

    levels: nn.Sequential

    def _init_weights(self) -> None:
        for level in self.levels:
            nn.init.trunc_normal_(level.pos_embed, std=0.02, a=-2, b=2)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2, b=2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {f"levels.{i}.pos_embed" for i in range(len(self.levels))}


class Nest(NestLevelsMixin, VitkitModel):
    """Nested Transformer: local Transformers on non-overlapping blocks, aggregated level by level."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        patch_size: int = 4,
        num_levels: int = 3,
        embed_dims: tuple[int, ...] = (128, 256, 512),
        num_heads: tuple[int, ...] = (4, 8, 16),
        depths: tuple[int, ...] = (2, 2, 20),
        num_classes: int = 1000,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pad_type: str = "",
        attn_type: str = "mha",
    ):
        """
        Args:
            img_size: the default (and only) input size; sets the block size. Each side must be a multiple of
                ``patch_size * 2^(num_levels-1)``.
            num_levels: hierarchy depth T_d; level l holds ``4^(T_d - 1 - l)`` blocks.
            embed_dims, num_heads, depths: one entry per level.
            pad_type: '' (PyTorch symmetric padding) or 'same' (TF 'SAME', for the converted JAX weights).
            attn_type: 'mha' (multi-head) or 'mqa' (multi-query, as the official CIFAR models).
        """
        super().__init__()
        for arg, val in (("embed_dims", embed_dims), ("num_heads", num_heads), ("depths", depths)):
            if len(val) != num_levels:
                raise ValueError(f"Nest: {arg} needs one entry per level ({num_levels}), got {tuple(val)}")
        if attn_type not in ("mha", "mqa"):
            raise ValueError(f"Nest: attn_type must be 'mha' or 'mqa', got {attn_type!r}")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        self.drop_rate = drop_rate
        side = 2 ** (num_levels - 1)  # blocks per side at level 0
        self.input_multiple = patch_size * side
        self.img_size = check_img_size(self.name, img_size, self.input_multiple, "patch_size * 2^(num_levels-1)")
        h, w = self.img_size
        block = (h // self.input_multiple, w // self.input_multiple)

        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dims[0], flatten=False)
        dpr = drop_path_schedule(drop_path_rate, sum(depths))
        attn_layer = MultiQueryAttention if attn_type == "mqa" else NestAttention
        levels, prev = [], None
        for i in range(num_levels):
            g = 2 ** (num_levels - 1 - i)
            rates = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            levels.append(
                NestLevel(
                    (g, g),
                    block,
                    embed_dims[i],
                    prev,
                    depths[i],
                    num_heads[i],
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    rates,
                    pad_type,
                    attn_layer,
                )
            )
            prev = embed_dims[i]
        self.levels = nn.Sequential(*levels)
        self.norm = LayerNorm2d(embed_dims[-1], eps=1e-6)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = FeatureInfo(
            dict(num_chs=embed_dims[i], reduction=patch_size * 2**i, module=f"levels.{i}") for i in range(num_levels)
        )
        self._init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for level in self.levels:
            level.grad_checkpointing = enable

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, (self.input_multiple, self.input_multiple), self.img_size)
        return self.patch_embed(x)  # (B, C, H/p, W/p)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.levels(self._stem(x)))  # (B, C, H/(p*2^(L-1)), W/(p*2^(L-1)))

    # forward_intermediates / prune_intermediate_layers (VitkitModel) over the levels
    feature_stages = "levels"

    def _stage_forward(self, i: int, x: torch.Tensor, ctx: None) -> torch.Tensor:
        return self.levels[i](x)  # a level checkpoints its own Transformer layers

    def _stage_output(self, i: int, x: torch.Tensor, ctx: None, norm: bool, output_fmt: str) -> torch.Tensor:
        """A level's map; ``norm`` applies the final norm to the last level's map."""
        return self.norm(x) if norm and i == len(self.levels) - 1 else x

    def _stages_final(self, x: torch.Tensor, ctx: None) -> torch.Tensor:
        return self.norm(x)

    def _prune_tail(self) -> None:
        self.norm = nn.Identity()
        self.reset_classifier(0)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Nest) -> dict[str, torch.Tensor]:
    """Resample per-block position embeddings when the checkpoint was made for another block size."""
    for i, level in enumerate(model.levels):
        key = f"levels.{i}.pos_embed"
        pe = state_dict.get(key)
        if pe is None or pe.shape == level.pos_embed.shape:
            continue
        _, T, N, C = pe.shape
        side = int(round(N**0.5))
        if T != level.pos_embed.shape[1] or side * side != N:
            raise RuntimeError(
                f"{model.name}: {key} has shape {tuple(pe.shape)}; cannot map it onto {tuple(level.pos_embed.shape)}"
            )
        grid = pe[0].float().reshape(T, side, side, C).permute(0, 3, 1, 2)  # (T, C, s, s): each block an image
        grid = F.interpolate(grid, size=level.block, mode="bicubic", antialias=True)
        state_dict[key] = grid.permute(0, 2, 3, 1).reshape(1, T, -1, C).to(pe.dtype)
    return state_dict


# ---- variants ---------------------------------------------------------------------------------
# ImageNet (ARCHITECTURES.md §5.2): dims, heads, depths, the paper's drop-path rate
_IMAGENET = {
    "tiny": ((96, 192, 384), (3, 6, 12), (2, 2, 8), 0.2),
    "small": ((96, 192, 384), (3, 6, 12), (2, 2, 20), 0.3),
    "base": ((128, 256, 512), (4, 8, 16), (2, 2, 20), 0.5),
}
# CIFAR (§5.3): constant width, 4 levels of 3 layers, pixel tokens, 4x4-token blocks, multi-query attention
_CIFAR = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}


def _register(name: str, args: dict, cfg: dict, pretrained: list[PretrainedCfg]) -> None:
    register_variant(
        name, Nest, args, family="nest", cfg=cfg, pretrained=pretrained, checkpoint_filter=checkpoint_filter_fn
    )


for _size, (_dims, _heads, _depths, _dpr) in _IMAGENET.items():
    for _jx in (False, True):
        _name = f"nest_{_size}" + ("_jx" if _jx else "")
        _args = dict(
            embed_dims=_dims, num_heads=_heads, depths=_depths, drop_path_rate=_dpr, pad_type="same" if _jx else ""
        )
        _cfg = default_cfg(crop_pct=0.875, test_input_size=(3, 32, 32))
        _tags = (
            [PretrainedCfg(tag="goog_in1k", hf_hub_id=f"timm/{_name}.goog_in1k", crop_pct=0.875, license="apache-2.0")]
            if _jx
            else []
        )
        _register(_name, _args, _cfg, _tags)

for _size, (_dim, _h) in _CIFAR.items():
    _args = dict(
        img_size=32,
        patch_size=1,
        num_levels=4,
        embed_dims=(_dim,) * 4,
        num_heads=(_h,) * 4,
        depths=(3, 3, 3, 3),
        num_classes=10,
        pad_type="same",
        attn_type="mqa",
    )
    _cfg = default_cfg(
        input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, crop_pct=1.0, test_input_size=(3, 16, 16)
    )
    _register(f"nest_{_size}_cifar", _args, _cfg, [])
