"""Axial attention models: Axial-ViT and Axial-ResNet (the ViT paper's appendix D axial study).

Papers: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021 (arXiv 2010.11929), appendix "Axial
attention"; Ho et al., "Axial Attention in Multidimensional Transformers" (arXiv 1912.12180); Wang et al.,
"Axial-DeepLab: Stand-Alone Axial-Attention for Panoptic Segmentation", ECCV 2020 (arXiv 2003.07853).
Layout reference for Axial-ResNet: ``csrhddlam/axial-deeplab`` ``lib/models/axialnet.py`` (read for the layout;
parameter names here are vitkit's, so its checkpoints do not load unchanged).

* **Axial-ViT** (``axial_vit_base_patch16_224``, ``axial_vit_base_patch32_224``; ``axial_vit_tiny_patch16_224``, ours:
  ViT-Ti's width with 6 axial blocks, i.e. ViT-Ti's 12 Transformer blocks and parameter count):
  ViT with each Transformer block replaced by an axial block: row self-attention + MLP, then column
  self-attention + MLP (two pre-norm ViT blocks, the first over each row of the patch grid, the second over each
  column). Ours, where the paper is not specific: no class token (a row or column attention has no place for
  it): patch tokens are mean-pooled then LayerNorm'd (ViT's ``global_pool='avg'``); one learned 1-D position
  embedding per patch (N x D) added at the input, resampled at other grid sizes as ViT's.
* **Axial-ResNet** (``axial_resnet50``, ``axial_resnet26s``): ResNet bottlenecks whose 3x3 conv is replaced by
  two position-sensitive axial-attention layers (Axial-DeepLab eq. 4: height axis, then width axis), then ReLU.
  Each layer: per head, ``softmax(q.k + q.r_q + k.r_k)`` over the axis applied to ``v + r_v``, with relative
  embeddings ``r_q, r_k, r_v`` of the offset (shared by the heads), 8 heads, query/key width half the value width,
  and BatchNorm on the q/k/v projection, on each of the three logit terms and on the two output terms (the
  paper: "batch normalizations in all attention layers"). A strided block average-pools 2x2 after its attention
  pair, as the reference does. The attention is global along its axis: the relative tables span the map at
  ``img_size``; at other sizes offsets beyond that are clipped to the table's ends (ours).
  ``axial_resnet50`` replaces the 3x3 convs of ResNet-50 itself (stem 64, bottleneck widths 64/128/256/512,
  expansion 4: the issue's and the ViT paper's wording; ours where Axial-DeepLab's own "Axial-ResNet-L" is
  wider); ``axial_resnet26s`` is the reference repository's released Axial-ResNet-26-S (stem 32, widths
  64/128/256/512, expansion 2, blocks 1/2/4/1; 5.9M parameters in its README), registered to check the layout.

The position-sensitive attention has no fused path: BatchNorm acts on each logit term before the softmax. Its
probabilities pass the ``attn_probs`` hook as everywhere else. Axial-ViT's attention is vitkit's ``Attention``
(fused and eager paths).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from vitkit.layers import Block, ConvNormAct, PatchEmbed, drop_path_schedule, resample_abs_pos_embed
from vitkit.layers.helpers import trunc_normal_linears_
from vitkit.models._base import ConvStagesModel, FeatureInfo, VitkitModel, check_img_size
from vitkit.models._registry import INCEPTION_MEAN, INCEPTION_STD, default_cfg, register_variant

# ---- Axial-ViT ---------------------------------------------------------------------------------------------------


class AxialBlock(nn.Module):
    """Row self-attention + MLP, then column self-attention + MLP, on a token grid ``(B, H, W, C)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: float, norm_layer) -> None:  # fmt: skip
        super().__init__()
        self.row = Block(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, norm_layer=norm_layer)
        self.col = Block(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, norm_layer=norm_layer)

    def row_step(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        return self.row(x.reshape(B * H, W, C)).reshape(B, H, W, C)  # each row a sequence of W tokens

    def col_step(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = self.col(x.transpose(1, 2).reshape(B * W, H, C))  # each column a sequence of H tokens
        return x.reshape(B, W, H, C).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.col_step(self.row_step(x))


class AxialVisionTransformer(VitkitModel):
    """Axial-ViT: patch tokens + learned position embedding -> axial blocks on the grid -> mean pool -> head."""

    feature_stages = "blocks"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        """
        Args:
            img_size: the input size; each side a multiple of the patch size (the position embedding is sized by
                it).
            depth: number of axial blocks (each a row block and a column block).
            drop_rate: dropout in MLPs and attention outputs, after the position embedding and before the head.
        """
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.img_size = check_img_size(self.name, img_size, self.patch_embed.reduction, "the patch size")
        self.input_multiple = patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_schedule(drop_path_rate, depth)
        self.blocks = nn.Sequential(
            *[
                AxialBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], norm_layer)
                for i in range(depth)
            ]
        )
        self.fc_norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = FeatureInfo(
            dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)
        )
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_linears_(self)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def _stages_input(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Image -> token grid ``(B, H, W, C)`` with the position embedding."""
        self.check_input(x, self.patch_embed.reduction, self.patch_embed.img_size)
        gh, gw = self.patch_embed.grid_size
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)  # (B, N, C)
        return x.reshape(x.shape[0], gh, gw, -1), None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._stages_input(x)
        return self.run_blocks(self.blocks, x)  # (B, H, W, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(x.mean(dim=(1, 2))))
        return x if pre_logits else self.head(x)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _stage_forward(self, i: int, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.run_blocks([self.blocks[i]], x)

    def _stage_output(self, i: int, x: torch.Tensor, ctx, norm: bool, output_fmt: str) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)

    def _stages_final(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return x

    def _prune_tail(self) -> None:
        self.fc_norm = nn.Identity()
        self.reset_classifier(0)


def axial_vit_filter_fn(state_dict: dict[str, torch.Tensor], model: AxialVisionTransformer) -> dict:
    """Resample the position embedding of a checkpoint made for another grid (bicubic, as ViT's)."""
    pe = state_dict.get("pos_embed")
    if pe is not None and pe.shape != model.pos_embed.shape:
        state_dict["pos_embed"] = resample_abs_pos_embed(pe, model.patch_embed.grid_size, num_prefix_tokens=0)
    return state_dict


# ---- Axial-ResNet ------------------------------------------------------------------------------------------------


class PositionSensitiveAxialAttention(nn.Module):
    """Axial-DeepLab's position-sensitive self-attention along one axis of an NCHW map (module docstring).

    Parameters: ``qkv`` (1x1, C -> 2C, no bias: q and k C/2 each, v C), ``bn_qkv``, ``bn_logits`` (one channel per
    head and term: q.k, q.r_q, k.r_k), ``bn_out`` (per channel of the two terms: attention of v, of r_v),
    ``relative`` ``(2C / heads, 2 span - 1)`` (r_q, r_k, r_v stacked, shared by the heads).
    """

    def __init__(self, dim: int, num_heads: int = 8, span: int = 56, axis: str = "height"):
        super().__init__()
        if axis not in ("height", "width"):
            raise ValueError(f"PositionSensitiveAxialAttention: axis must be 'height' or 'width', got {axis!r}")
        if dim % (2 * num_heads):
            raise ValueError(f"PositionSensitiveAxialAttention: dim ({dim}) must be divisible by 2 * num_heads")
        self.dim, self.num_heads, self.span, self.axis = dim, num_heads, span, axis
        self.head_dim = dim // num_heads  # the value width; queries and keys have half of it
        self.qkv = nn.Conv1d(dim, 2 * dim, 1, bias=False)
        self.bn_qkv = nn.BatchNorm1d(2 * dim)
        self.bn_logits = nn.BatchNorm2d(3 * num_heads)
        self.bn_out = nn.BatchNorm1d(2 * dim)
        self.relative = nn.Parameter(torch.zeros(2 * self.head_dim, 2 * span - 1))
        self.attn_probs = nn.Identity()  # hook point: (B * other axis, heads, L, L)
        nn.init.normal_(self.qkv.weight, 0.0, math.sqrt(1.0 / dim))
        nn.init.normal_(self.relative, 0.0, math.sqrt(1.0 / self.head_dim))

    def relative_embeddings(self, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``r_q, r_k, r_v`` as ``(c, L, L)`` tables indexed [channel, query i, key j] by the offset ``j - i``
        (clipped to the table's range ``+-(span - 1)``)."""
        pos = torch.arange(length, device=self.relative.device)
        idx = (pos[None, :] - pos[:, None]).clamp(-(self.span - 1), self.span - 1) + self.span - 1  # (L, L)
        emb = self.relative[:, idx]  # (2 * head_dim, L, L)
        d = self.head_dim // 2
        return emb[:d], emb[d : 2 * d], emb[2 * d :]

    def _lines(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW -> ``(B * other, C, L)``: one sequence per column (height axis) or per row (width axis)."""
        B, C, H, W = x.shape
        if self.axis == "height":
            return x.permute(0, 3, 1, 2).reshape(B * W, C, H)
        return x.permute(0, 2, 1, 3).reshape(B * H, C, W)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The three logit terms ``(n, 3, heads, L, L)`` before their BatchNorm, and the values ``(n, heads, c, L)``."""
        n, C, L = x.shape
        qkv = self.bn_qkv(self.qkv(x)).reshape(n, self.num_heads, 2 * self.head_dim, L)
        d = self.head_dim // 2
        q, k, v = qkv[:, :, :d], qkv[:, :, d : 2 * d], qkv[:, :, 2 * d :]  # (n, heads, c, L)
        rq, rk, _ = self.relative_embeddings(L)
        qk = torch.einsum("nhci,nhcj->nhij", q, k)
        qr = torch.einsum("nhci,cij->nhij", q, rq)  # query i with the offset to key j
        kr = torch.einsum("nhcj,cij->nhij", k, rk)  # key j with the same offset
        return torch.stack([qk, qr, kr], dim=1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        lines = self._lines(x)
        n, _, L = lines.shape
        terms, v = self.logits(lines)
        terms = self.bn_logits(terms.reshape(n, 3 * self.num_heads, L, L)).reshape(n, 3, self.num_heads, L, L)
        attn = self.attn_probs(terms.sum(dim=1).softmax(dim=-1))  # (n, heads, L, L)
        _, _, rv = self.relative_embeddings(L)
        sv = torch.einsum("nhij,nhcj->nhci", attn, v)
        sr = torch.einsum("nhij,cij->nhci", attn, rv)
        out = torch.stack([sv, sr], dim=-2).reshape(n, 2 * C, L)  # per channel: [attention of v, of r_v]
        out = self.bn_out(out).reshape(n, C, 2, L).sum(dim=2)  # (n, C, L)
        if self.axis == "height":
            return out.reshape(B, W, C, H).permute(0, 2, 3, 1)
        return out.reshape(B, H, C, W).permute(0, 2, 1, 3)


class AxialBottleneck(nn.Module):
    """1x1 conv-BN-ReLU -> height attention -> width attention -> (2x2 avg-pool if strided) -> ReLU -> 1x1 conv-BN,
    plus the shortcut, then ReLU."""

    def __init__(self, in_chs: int, width: int, out_chs: int, stride: int, span: tuple[int, int], num_heads: int):
        super().__init__()
        self.conv1 = ConvNormAct(in_chs, width, 1)
        self.attn_h = PositionSensitiveAxialAttention(width, num_heads, span[0], "height")
        self.attn_w = PositionSensitiveAxialAttention(width, num_heads, span[1], "width")
        self.pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.conv3 = ConvNormAct(width, out_chs, 1, act_layer=None)
        self.shortcut = (
            ConvNormAct(in_chs, out_chs, 1, stride, act_layer=None) if stride > 1 or in_chs != out_chs else None
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn_w(self.attn_h(self.conv1(x)))
        y = self.conv3(self.act(self.pool(y)))
        return self.act(y + (x if self.shortcut is None else self.shortcut(x)))


class AxialResNet(ConvStagesModel):
    """Axial-ResNet: 7x7 conv stem + max-pool, four stages of axial bottlenecks, global average pool, head."""

    min_input_size = 32

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        expansion: int = 4,
        stem_width: int = 64,
        num_heads: int = 8,
        drop_rate: float = 0.0,
    ):
        """
        Args:
            img_size: the default input size; each side a multiple of 32 (it sizes the relative-position tables:
                the attention span of each stage is its map at this size).
            layers: blocks per stage; widths: each stage's attention width; expansion: block output / width.
        """
        super().__init__()
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.img_size = check_img_size(self.name, img_size, 32, "the network's stride")
        self.input_multiple = 32
        self.stem = nn.Sequential(ConvNormAct(in_chans, stem_width, 7, 2), nn.MaxPool2d(3, 2, 1))
        h, w = self.img_size[0] // 4, self.img_size[1] // 4  # the map each block's attention runs on
        prev, stages, info = stem_width, [], []
        for i, (n, width) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(AxialBottleneck(prev, width, width * expansion, stride, (h, w), num_heads))
                prev = width * expansion
                h, w = h // stride, w // stride
            stages.append(nn.Sequential(*blocks))
            info.append(dict(num_chs=prev, reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.feature_info = FeatureInfo(info)
        self._build_tail(prev, 0, num_classes, drop_rate, None)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # each residual branch starts at zero (the block is an identity at first)
            if isinstance(m, AxialBottleneck):
                nn.init.zeros_(m.conv3.bn.weight)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, (32, 32))
        return self.stem(x)


# ---- variants ------------------------------------------------------------------------------------------------------
# Axial-ViT: name: (patch, embed_dim, depth in axial blocks, heads)   [ViT-B (ARCHITECTURES.md §1.1), the paper's
# Axial-ViT-B; Ti (ours, the small variant for tests): ViT-Ti's width and heads, 6 axial blocks = ViT-Ti's 12
# Transformer blocks and about its parameter count (5.7M)]
AXIAL_VIT_VARIANTS = {
    "axial_vit_tiny_patch16_224": (16, 192, 6, 3),
    "axial_vit_base_patch16_224": (16, 768, 12, 12),
    "axial_vit_base_patch32_224": (32, 768, 12, 12),
}
# Axial-ResNet: name: (layers, widths, expansion, stem_width)
AXIAL_RESNET_VARIANTS = {
    "axial_resnet50": ((3, 4, 6, 3), (64, 128, 256, 512), 4, 64),
    "axial_resnet26s": ((1, 2, 4, 1), (64, 128, 256, 512), 2, 32),
}

for _name, (_p, _d, _depth, _h) in AXIAL_VIT_VARIANTS.items():
    register_variant(
        _name,
        AxialVisionTransformer,
        dict(img_size=224, patch_size=_p, embed_dim=_d, depth=_depth, num_heads=_h),
        family="axial",
        cfg=default_cfg(mean=INCEPTION_MEAN, std=INCEPTION_STD, test_input_size=(3, 4 * _p, 4 * _p)),
        checkpoint_filter=axial_vit_filter_fn,
    )
for _name, (_layers, _widths, _exp, _stem) in AXIAL_RESNET_VARIANTS.items():
    register_variant(
        _name,
        AxialResNet,
        dict(img_size=224, layers=_layers, widths=_widths, expansion=_exp, stem_width=_stem),
        family="axial",
        cfg=default_cfg(first_conv="stem.0.conv", classifier="head.fc", crop_pct=0.875, test_input_size=(3, 64, 64)),
    )
