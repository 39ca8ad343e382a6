"""MobileViT (v1) and MobileViTv2.

Papers: Mehta & Rastegari, "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer",
ICLR 2022 (arXiv 2110.02178); "Separable Self-attention for Mobile Vision Transformers" (arXiv 2206.02680).
Official code: apple/ml-cvnets. Reference for parameter layout and numerics: timm ``mobilevit.py`` (built on
its ByobNet: ``stem``, ``stages.i.j``, ``final_conv``, ``head.fc``), so timm/cvnets-converted checkpoints load.

* MV2 block: 1x1 expand + BN + SiLU, 3x3 depthwise (stride s) + BN + SiLU, 1x1 project + BN; residual when the
  shape is unchanged (ARCHITECTURES.md §4.1).
* MobileViT block: 3x3 conv + 1x1 to d; :func:`patch_sequences` into 2x2 patches; L Transformer layers across
  patches for each intra-patch position; :func:`fold_patches`; 1x1 back to C; concat with the input; 3x3 fusion.
* v2 block: depthwise 3x3 + 1x1; separable (linear) self-attention layers on ``[B, d, P, N]``; fold; 1x1 + BN.

Export path: :func:`unfold_patches`, :func:`patch_sequences` and :func:`fold_patches` use only reshapes/permutes of
at most 4-D tensors.

Input sizes: there are no position embeddings, so any size whose sides are multiples of 32 runs without
resampling anything. Other sizes of at least 32 are accepted: a MobileViT block whose map has an odd side
resizes it bilinearly to the next multiple of the patch size and back (the cvnets/timm rule). ``img_size`` is the
data config's default input size, as in every family; below 32 it is refused when the model is built.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers import Block, ConvNormAct, DropPath, drop_path_schedule, make_divisible
from vitkit.models._base import ConvStagesModel, FeatureInfo, check_img_size
from vitkit.models._hf import rename, strip_prefix, transformer_layers
from vitkit.models._registry import PretrainedCfg, default_cfg, register_variant

if TYPE_CHECKING:
    from vitkit.interpret import AttentionRecord
    from vitkit.interpret.geometry import ImageQuery


def unfold_patches(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, P, N]``: P pixels per patch (row-major), N patches (row-major).

    Entry ``[b, c, p, n]`` is pixel ``p`` of patch ``n``; all 4-D, so ONNX/Core ML converters accept it.
    """
    B, C, H, W = x.shape
    ph, pw = patch
    nh, nw = H // ph, W // pw
    x = x.reshape(B * C * nh, ph, nw, pw).permute(0, 1, 3, 2)  # (B*C*nh, ph, pw, nw)
    x = x.reshape(B * C, nh, ph * pw, nw).permute(0, 2, 1, 3)  # (B*C, P, nh, nw)
    return x.reshape(B, C, ph * pw, nh * nw)


def patch_sequences(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B * P, N, C]``: one sequence of the N patches per batch image and pixel place p in the
    patch, the same values as ``unfold_patches(x).permute(0, 2, 3, 1).reshape(B * P, N, C)``.

    Written with the channels innermost at every step (all 4-D), so the last step is a copy into a new row-major
    buffer for any batch size. The other order ends in a view at batch 1 whose rows are channel planes, which
    Inductor hands as such to the transformer's first residual add; fused into oneDNN's int8 linear (PT2E), a
    transposed addend sends that product to oneDNN's reference kernel (MobileViT-XS at batch 1: 3 calls, 0.65 s).
    No step merges the channels with another dimension: an earlier version merged them with the columns and split
    them out again, which left Inductor an index (``(c + 96 n) % 1536 % 96``) it did not reduce to ``c``, so the
    LayerNorm that follows ran scalar (MobileViT-XS's stride-8 block: 470 us, 69 us with this order; 1 thread,
    AVX-512 AMD EPYC).
    """
    B, C, H, W = x.shape
    ph, pw = patch
    nh, nw = H // ph, W // pw
    x = x.permute(0, 2, 3, 1).reshape(B * nh * ph, nw, pw, C).permute(0, 2, 1, 3)  # (B nh ph, pw, nw, C)
    x = x.reshape(B, nh, ph * pw * nw, C).permute(0, 2, 1, 3)  # (B, ph pw nw, nh, C)
    x = x.reshape(B * ph * pw, nw, nh, C).permute(0, 2, 1, 3)  # (B ph pw, nh, nw, C)
    return x.reshape(B * ph * pw, nh * nw, C).contiguous()  # (a view, not a copy, where nw is 1)


def fold_patches(x: torch.Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    """Exact inverse of :func:`unfold_patches`: ``[B, C, P, N]`` -> ``[B, C, H, W]``."""
    B, C, P, N = x.shape
    (nh, nw), (ph, pw) = grid, patch
    x = x.reshape(B * C, P, nh, nw).permute(0, 2, 1, 3)  # (B*C, nh, P, nw)
    x = x.reshape(B * C * nh, ph, pw, nw).permute(0, 1, 3, 2)  # (B*C*nh, ph, nw, pw)
    return x.reshape(B, C, nh * ph, nw * pw)


def _resize_to_patches(x: torch.Tensor, patch: tuple[int, int], align_corners: bool):
    """Bilinear resize so both sides are multiples of the patch; returns the map and its original size."""
    H, W = x.shape[-2:]
    new = (math.ceil(H / patch[0]) * patch[0], math.ceil(W / patch[1]) * patch[1])
    if new != (H, W):
        x = F.interpolate(x, size=new, mode="bilinear", align_corners=align_corners)
    return x, (H, W)


def patch_sequence_cells(p: torch.Tensor, patch: tuple[int, int], query: ImageQuery) -> torch.Tensor:
    """Attention across patches as an ``attention_geometry``: ``p`` (B, P, heads, N, N), or (B, P, 1, 1, N) for
    v2's context scores (the same for every query of an offset). The keys of a query are the pixels at its
    intra-patch offset in every patch, on the map's grid of ``patch``-sized patches: ``(B, heads, H', W')``."""
    ph, pw = patch
    nh, nw = query.grid(p.shape[-1])  # the patch grid: laid out with the image's aspect ratio
    grid = (nh * ph, nw * pw)
    fy, fx = query.cell(grid)
    off, n_q = (fy % ph) * pw + fx % pw, (fy // ph) * nw + fx // pw
    row = p[:, off, :, n_q if p.shape[-2] > 1 else 0, :]  # (B, heads, N)
    cells = row.new_zeros(row.shape[0], p.shape[2], *grid)
    cells[:, :, fy % ph :: ph, fx % pw :: pw] = row.reshape(row.shape[0], p.shape[2], nh, nw)
    return cells


class InvertedResidual(nn.Module):
    """MobileNetV2 block (timm ByobNet 'bottle' layout: ``conv1_1x1``, ``conv2_kxk``, ``conv3_1x1``)."""

    def __init__(
        self, in_chs: int, out_chs: int, stride: int, expand: float, drop_path: float = 0.0, dilation: int = 1
    ):
        super().__init__()
        mid = make_divisible(in_chs * expand)
        self.has_residual = stride == 1 and in_chs == out_chs
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1, act_layer=nn.SiLU)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride, groups=mid, act_layer=nn.SiLU, dilation=dilation)
        self.conv3_1x1 = ConvNormAct(mid, out_chs, 1, act_layer=None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2_kxk(self.conv1_1x1(x))
        if self.has_residual:
            return self.drop_path(self.conv3_1x1(y)) + x
        return self.conv3_1x1(y)


class MobileViTBlock(nn.Module):
    """Local conv -> unfold -> Transformer across patches -> fold -> 1x1 -> concat + 3x3 fusion (paper Fig. 1b)."""

    def __init__(
        self,
        chs: int,
        dim: int,
        depth: int,
        mlp_ratio: float = 2.0,
        num_heads: int = 4,
        patch_size: int = 2,
        drop_path: float = 0.0,
        drop: float = 0.0,
    ):
        super().__init__()
        self.patch = (patch_size, patch_size)
        self.conv_kxk = ConvNormAct(chs, chs, 3, act_layer=nn.SiLU)
        self.conv_1x1 = nn.Conv2d(chs, dim, 1, bias=False)
        self.transformer = nn.Sequential(
            *[
                Block(dim, num_heads, mlp_ratio, True, drop, 0.0, drop_path, act_layer=nn.SiLU, norm_layer=nn.LayerNorm)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)
        self.conv_proj = ConvNormAct(dim, chs, 1, act_layer=nn.SiLU)
        self.conv_fusion = ConvNormAct(2 * chs, chs, 3, act_layer=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        y, size = _resize_to_patches(self.conv_1x1(self.conv_kxk(x)), self.patch, align_corners=False)
        B, C, H, W = y.shape
        grid = (H // self.patch[0], W // self.patch[1])
        P, N = self.patch[0] * self.patch[1], grid[0] * grid[1]
        y = patch_sequences(y, self.patch)  # one sequence of N patches per intra-patch pixel position: (B*P, N, C)
        y = self.norm(self.transformer(y))
        y = y.reshape(B, P, N, C).permute(0, 3, 1, 2)  # (B, C, P, N)
        y = fold_patches(y, grid, self.patch)
        if (H, W) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        y = self.conv_proj(y)
        return self.conv_fusion(torch.cat((shortcut, y), dim=1))

    def attention_geometry(self, record: AttentionRecord, query: ImageQuery) -> torch.Tensor:
        """The Transformer's attention (B*P, heads, N, N): one sequence of N patches per intra-patch offset."""
        p = record.probs
        return patch_sequence_cells(p.reshape(-1, self.patch[0] * self.patch[1], *p.shape[1:]), self.patch, query)


class LinearSelfAttention(nn.Module):
    """Separable self-attention (MobileViTv2 §3): O(k d) context from softmax-normalised scores, on ``[B, d, P, N]``."""

    def __init__(self, dim: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.qkv_proj = nn.Conv2d(dim, 1 + 2 * dim, 1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.attn_probs = nn.Identity()  # hook point: context scores (B, 1, P, N)
        self.out_proj = nn.Conv2d(dim, dim, 1)
        self.out_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([1, self.dim, self.dim], dim=1)  # (B,1,P,N), (B,d,P,N), (B,d,P,N)
        scores = self.attn_drop(self.attn_probs(q.softmax(dim=-1)))  # over the N patches
        context = (k * scores).sum(dim=-1, keepdim=True)  # (B, d, P, 1)
        return self.out_drop(self.out_proj(F.relu(v) * context))


class ConvMlp(nn.Module):
    """1x1 conv -> act -> dropout -> 1x1 conv, on ``[B, d, P, N]``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.SiLU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LinearTransformerBlock(nn.Module):
    """Pre-norm block with GroupNorm(1) ("layer_norm_2d"), separable attention and a conv MLP."""

    def __init__(self, dim: int, mlp_ratio: float = 2.0, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.attn = LinearSelfAttention(dim, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MobileViTV2Block(nn.Module):
    """Depthwise 3x3 + 1x1 -> unfold -> separable-attention layers -> fold -> 1x1 + BN (no fusion)."""

    def __init__(self, chs: int, depth: int, patch_size: int = 2, drop_path: float = 0.0, drop: float = 0.0):
        super().__init__()
        dim = make_divisible(0.5 * chs)
        self.patch = (patch_size, patch_size)
        self.conv_kxk = ConvNormAct(chs, chs, 3, groups=chs, act_layer=nn.SiLU)
        self.conv_1x1 = nn.Conv2d(chs, dim, 1, bias=False)
        self.transformer = nn.Sequential(*[LinearTransformerBlock(dim, 2.0, drop, drop_path) for _ in range(depth)])
        self.norm = nn.GroupNorm(1, dim)
        self.conv_proj = ConvNormAct(dim, chs, 1, act_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = _resize_to_patches(x, self.patch, align_corners=True)  # v2 resizes the block input (cvnets)
        x = self.conv_1x1(self.conv_kxk(x))
        grid = (x.shape[2] // self.patch[0], x.shape[3] // self.patch[1])
        x = self.norm(self.transformer(unfold_patches(x, self.patch)))  # (B, d, P, N)
        return self.conv_proj(fold_patches(x, grid, self.patch))

    def attention_geometry(self, record: AttentionRecord, query: ImageQuery) -> torch.Tensor:
        """The separable attention's context scores (B, 1, P, N): one distribution over patches per offset."""
        return patch_sequence_cells(record.probs.transpose(1, 2)[:, :, None], self.patch, query)  # (B, P, 1, 1, N)


@dataclass(frozen=True)
class MV2Stage:
    """A stage of ``depth`` MobileNetV2 inverted residuals; the first one has the stride."""

    depth: int
    chs: int
    stride: int
    expand: float  # the MV2 expansion ratio t

    @property
    def num_blocks(self) -> int:
        return self.depth

    def build(
        self, in_chs: int, version: int, drop_path: Iterator[float], drop: float, stride: int, dilation: int = 1
    ) -> list[nn.Module]:
        blocks = []
        for j in range(self.depth):
            s, prev = (stride, in_chs) if j == 0 else (1, self.chs)
            blocks.append(InvertedResidual(prev, self.chs, s, self.expand, next(drop_path), dilation if j == 0 else 1))
        return blocks


@dataclass(frozen=True)
class MobileViTStage:
    """A strided inverted residual followed by one MobileViT block (v1) or MobileViTv2 block (v2)."""

    chs: int
    stride: int
    expand: float  # the inverted residual's expansion ratio t
    depth: int  # Transformer layers L in the MobileViT block
    dim: int | None = None  # v1: Transformer width d; v2 derives it from chs (d = C / 2) and takes None

    @property
    def num_blocks(self) -> int:
        return 2

    def build(
        self, in_chs: int, version: int, drop_path: Iterator[float], drop: float, stride: int, dilation: int = 1
    ) -> list[nn.Module]:
        down = InvertedResidual(in_chs, self.chs, stride, self.expand, next(drop_path), dilation)
        if version == 1:
            if self.dim is None:
                raise ValueError(f"MobileViT: a v1 MobileViTStage needs its Transformer width dim, got {self}")
            return [down, MobileViTBlock(self.chs, self.dim, self.depth, drop_path=next(drop_path), drop=drop)]
        return [down, MobileViTV2Block(self.chs, self.depth, drop_path=next(drop_path), drop=drop)]


class MobileViT(ConvStagesModel):
    """MobileViT backbone: stem, five stages (MV2 blocks, MobileViT blocks in stages 3-5), 1x1 conv, head."""

    def __init__(
        self,
        stage_cfgs: tuple[MV2Stage | MobileViTStage, ...],
        stem_chs: int,
        num_features: int = 0,
        version: int = 1,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        img_size: int | tuple[int, int] = 256,
        output_stride: int = 32,
    ):
        """
        Args:
            stage_cfgs: one :class:`MV2Stage` or :class:`MobileViTStage` per stage.
            num_features: width of the final 1x1 conv (0: none, as in v2).
            version: 1 (MobileViT blocks) or 2 (MobileViTv2 blocks).
            img_size: the default input size (of the data config); the network itself takes any size of at
                least ``min_input_size`` (32) pixels, and a smaller ``img_size`` is an error.
            output_stride: 32, or 16 / 8 for dense heads (DeepLabv3): a stage whose stride would pass it keeps
                stride 1, and its downsampling inverted residual takes the dilation reached before it, as in
                ml-cvnets and transformers (so at 16 nothing is dilated; at 8 the last stage's is 2).
        """
        super().__init__()
        self.img_size = check_img_size(self.name, img_size, minimum=self.min_input_size)
        if version not in (1, 2):
            raise ValueError(f"MobileViT: version must be 1 or 2, got {version!r}")
        for cfg in stage_cfgs:
            if not isinstance(cfg, (MV2Stage, MobileViTStage)):
                raise ValueError(f"MobileViT: stage_cfgs entries must be MV2Stage or MobileViTStage, got {cfg!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.stem = ConvNormAct(in_chans, stem_chs, 3, 2, act_layer=nn.SiLU)
        dpr = iter(drop_path_schedule(drop_path_rate, sum(c.num_blocks for c in stage_cfgs)))
        if output_stride not in (8, 16, 32):
            raise ValueError(f"MobileViT: output_stride must be 8, 16 or 32, got {output_stride!r}")
        stages, prev, reduction, dilation = [], stem_chs, 2, 1
        self.feature_info = FeatureInfo()
        for i, cfg in enumerate(stage_cfgs):
            stride, first_dilation = cfg.stride, dilation
            if reduction * stride > output_stride:  # dilate instead of striding
                dilation, stride = dilation * stride, 1
            stages.append(nn.Sequential(*cfg.build(prev, version, dpr, drop_rate, stride, first_dilation)))
            prev = cfg.chs
            reduction *= stride
            self.feature_info.append(dict(num_chs=prev, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self._build_tail(
            prev, num_features, num_classes, drop_rate, lambda i, o: ConvNormAct(i, o, 1, act_layer=nn.SiLU)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


# ---- checkpoint conversion ---------------------------------------------------------------------
# transformers' MobileViTForImageClassification (apple/mobilevit-*) -> this layout, in order (see models/_hf.py)
_HF_RULES = [
    (r"^conv_stem\.", "stem."),
    (r"^conv_1x1_exp\.", "final_conv."),
    (r"^classifier\.", "head.fc."),
    (r"^encoder\.layer\.(\d+)\.layer\.(\d+)\.", r"stages.\1.\2."),
    (r"^encoder\.layer\.(\d+)\.downsampling_layer\.", r"stages.\1.0."),
    (r"^encoder\.layer\.(\d+)\.layernorm\.", r"stages.\1.1.norm."),
    (r"^encoder\.layer\.(\d+)\.conv_projection\.", r"stages.\1.1.conv_proj."),
    (r"^encoder\.layer\.(\d+)\.fusion\.", r"stages.\1.1.conv_fusion."),
    (r"^encoder\.layer\.(\d+)\.(conv_kxk|conv_1x1)\.", r"stages.\1.1.\2."),
    (r"\.expand_1x1\.", ".conv1_1x1."),
    (r"\.conv_3x3\.", ".conv2_kxk."),
    (r"\.reduce_1x1\.", ".conv3_1x1."),
    (r"conv_1x1\.convolution\.", "conv_1x1."),
    (r"\.convolution\.", ".conv."),
    (r"\.normalization\.", ".bn."),
]
_TO_HF_RULES = [  # the inverse, for writing a transformers-layout file (tests, exports)
    (r"^stem\.", "conv_stem."),
    (r"^final_conv\.", "conv_1x1_exp."),
    (r"^head\.fc\.", "classifier."),
    (r"^stages\.([01])\.(\d+)\.", r"encoder.layer.\1.layer.\2."),
    (r"^stages\.(\d+)\.0\.", r"encoder.layer.\1.downsampling_layer."),
    (r"^stages\.(\d+)\.1\.norm\.", r"encoder.layer.\1.layernorm."),
    (r"^stages\.(\d+)\.1\.conv_proj\.", r"encoder.layer.\1.conv_projection."),
    (r"^stages\.(\d+)\.1\.conv_fusion\.", r"encoder.layer.\1.fusion."),
    (r"^stages\.(\d+)\.1\.conv_1x1\.", r"encoder.layer.\1.conv_1x1.convolution."),
    (r"^stages\.(\d+)\.1\.(conv_kxk)\.", r"encoder.layer.\1.\2."),
    (r"\.conv1_1x1\.", ".expand_1x1."),
    (r"\.conv2_kxk\.", ".conv_3x3."),
    (r"\.conv3_1x1\.", ".reduce_1x1."),
    (r"\.conv\.", ".convolution."),
    (r"\.bn\.", ".normalization."),
]


_TO_HF_LAYER = [
    ("attn.proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
]


def hf_to_vitkit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers MobileViT (v1) state dict, with or without the ``mobilevit.`` prefix, in vitkit's layout."""
    sd = strip_prefix(state_dict, "mobilevit.")
    sd = transformer_layers(sd, r"encoder\.layer\.(\d+)\.transformer\.layer", r"stages.\1.1.transformer")
    return rename(sd, _HF_RULES)


def vitkit_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_vitkit`: transformers' ``MobileViTForImageClassification`` keys."""
    out = {}
    for k, v in state_dict.items():
        m = re.match(r"^stages\.(\d+)\.1\.transformer\.(\d+)\.(.*)$", k)
        if m:
            head, rest = f"encoder.layer.{m[1]}.transformer.layer.{m[2]}", m[3]
            if rest.startswith("attn.qkv."):
                for name, part in zip(("query", "key", "value"), v.chunk(3, 0)):
                    out[f"mobilevit.{head}.attention.attention.{name}.{rest.split('.')[-1]}"] = part.clone()
                continue
            for a, b in _TO_HF_LAYER:
                rest = rest.replace(a, b) if rest.startswith(a) else rest
            out[f"mobilevit.{head}.{rest}"] = v
            continue
        key = rename({k: v}, _TO_HF_RULES).popitem()[0]
        out[key if key.startswith("classifier.") else f"mobilevit.{key}"] = v
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert a transformers checkpoint (recognised by its ``conv_stem.convolution`` key); timm's and vitkit's
    layout is this one and passes unchanged."""
    if any(k.endswith("conv_stem.convolution.weight") for k in state_dict):
        return hf_to_vitkit(state_dict)
    return state_dict


# ---- variants ---------------------------------------------------------------------------------
def _v1(chs: tuple[int, ...], dims: tuple[int, ...], expand: float, num_features: int) -> dict:
    """MobileViT v1 (ARCHITECTURES.md §4.2; timm mobilevit.py): stem 16; MV2 stages of depth 1 and 3 (strides 1,
    2); three stride-2 MobileViT stages with L = 2, 4, 3 Transformer layers of widths ``dims``."""
    mv2 = (MV2Stage(1, chs[0], 1, expand), MV2Stage(3, chs[1], 2, expand))
    mvit = tuple(MobileViTStage(c, 2, expand, depth=L, dim=d) for c, d, L in zip(chs[2:], dims, (2, 4, 3)))
    return dict(stage_cfgs=mv2 + mvit, stem_chs=16, num_features=num_features, version=1)


def _v2(alpha: float) -> dict:
    """MobileViTv2 (§4.5): channels (64, 128, 256, 384, 512) * alpha, stem 32 * alpha, expansion 2, no final conv."""
    chs = [int(c * alpha) for c in (64, 128, 256, 384, 512)]
    mv2 = (MV2Stage(1, chs[0], 1, 2.0), MV2Stage(2, chs[1], 2, 2.0))
    mvit = tuple(MobileViTStage(c, 2, 2.0, depth=L) for c, L in zip(chs[2:], (2, 4, 3)))
    return dict(stage_cfgs=mv2 + mvit, stem_chs=int(32 * alpha), version=2)


_V1 = {
    "mobilevit_xxs": _v1(chs=(16, 24, 48, 64, 80), dims=(64, 80, 96), expand=2.0, num_features=320),
    "mobilevit_xs": _v1(chs=(32, 48, 64, 80, 96), dims=(96, 120, 144), expand=4.0, num_features=384),
    "mobilevit_s": _v1(chs=(32, 64, 96, 128, 160), dims=(144, 192, 240), expand=4.0, num_features=640),
}
_V2 = {
    "mobilevitv2_050": _v2(alpha=0.5),
    "mobilevitv2_075": _v2(alpha=0.75),
    "mobilevitv2_100": _v2(alpha=1.0),
    "mobilevitv2_125": _v2(alpha=1.25),
    "mobilevitv2_150": _v2(alpha=1.5),
    "mobilevitv2_175": _v2(alpha=1.75),
    "mobilevitv2_200": _v2(alpha=2.0),
}

_MV_CFG = dict(
    input_size=(3, 256, 256),
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    first_conv="stem.conv",
    classifier="head.fc",
    test_input_size=(3, 64, 64),
)


def _register(name: str, args: dict, crop_pct: float) -> None:
    tag = PretrainedCfg(
        tag="cvnets_in1k",
        hf_hub_id=f"timm/{name}.cvnets_in1k",
        input_size=(3, 256, 256),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        crop_pct=crop_pct,
        license="apple-ascl",
    )
    cfg = default_cfg(**_MV_CFG, crop_pct=crop_pct)
    register_variant(
        name, MobileViT, dict(args, img_size=256), family="mobilevit", cfg=cfg, pretrained=[tag],
        checkpoint_filter=checkpoint_filter_fn,
    )  # fmt: skip


for _name, _args in _V1.items():
    _register(_name, _args, 0.9)
for _name, _args in _V2.items():
    _register(_name, _args, 0.888)
