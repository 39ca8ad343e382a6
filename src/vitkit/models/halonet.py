"""HaloNet: ResNet-style backbones whose spatial mixing is blocked local self-attention with halos.

Paper: Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones", CVPR 2021
(arXiv 2103.12731). No official code. Reference for parameter layout and numerics: timm ``byoanet.py`` /
``byobnet.py`` / ``layers/halo_attn.py`` (``stem``, ``stages.i.j`` with ``conv1_1x1``, ``self_attn``,
``post_attn``, ``conv3_1x1``, ``shortcut``, ``final_conv``, ``head.fc``), so timm checkpoints load.

* ``halonet_h0`` ... ``halonet_h7``: the paper's family, reconstructed in ARCHITECTURES.md §2.2 (7x7 stem +
  max-pool; stages of halo-attention bottlenecks with widths w_i = 64 * 2^i; ``rv`` scales the value/output
  width of the attention, ``rb`` the block output, ``l3`` the third stage's depth, ``df`` an optional final 1x1
  conv). ``halonet_h1`` is also timm's name for the same network, and matches it.
* timm's hybrids ``halonet26t``, ``sehalonet33ts``, ``halonet50ts``, ``eca_halonext26ts`` (§2.3).
* ``halo_resnet50`` / ``halo_seresnet50``: the paper's controlled study, ResNet-50 (3, 4, 6, 3) with every 3x3
  conv replaced by halo attention (block 8, halo 3), without and with squeeze-and-excitation. Where SE sits
  in an attention block is not given by the paper; we put it after the attention's BN + activation, where a
  ResNet's SE follows its 3x3 conv.

Padding: halo layers pad their maps to a multiple of the block size and mask the padding out of the softmax
(see :mod:`vitkit.layers.halo_attention`), so any input of at least 32 px works; sizes whose stride-32 map is a
multiple of the block are exactly the reference's computation. ``img_size`` is the data config's default input
size, as in every family; below 32 it is refused when the model is built.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from vitkit.layers import ConvNormAct, DropPath, HaloAttention, drop_path_schedule, make_divisible
from vitkit.models._base import ConvStagesModel, FeatureInfo, check_img_size
from vitkit.models._registry import PretrainedCfg, default_cfg, register_variant


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation, keeping BatchNorm's parameter names (timm's ``post_attn``)."""

    def __init__(self, num_features: int, act_layer: type[nn.Module] = nn.ReLU):
        super().__init__(num_features)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class SEModule(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): global pool -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid gate."""

    def __init__(self, chs: int, rd_ratio: float = 1 / 16):
        super().__init__()
        rd = make_divisible(chs * rd_ratio, 8, round_limit=0.0)
        self.fc1 = nn.Conv2d(chs, rd, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd, chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class EcaModule(nn.Module):
    """Efficient channel attention (Wang et al. 2020): 1-D conv across pooled channels, adaptive kernel size."""

    def __init__(self, chs: int, gamma: int = 2, beta: int = 1):
        super().__init__()
        t = int(abs(math.log(chs, 2) + beta) / gamma)
        k = max(t if t % 2 else t + 1, 3)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean((2, 3)).unsqueeze(1))  # (B, 1, C)
        return x * y.sigmoid().transpose(1, 2).unsqueeze(-1)


_ATTN = {"": None, "se": SEModule, "eca": EcaModule}


def _shortcut(in_chs: int, out_chs: int, stride: int) -> nn.Module:
    """Identity when the shape is kept, else a strided 1x1 conv + BN (timm ByobNet 'conv1x1' downsample)."""
    if in_chs == out_chs and stride == 1:
        return nn.Identity()
    return ConvNormAct(in_chs, out_chs, 1, stride, act_layer=None)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (stride, groups) -> [SE/ECA] -> 1x1 (no act) + shortcut -> act (ResNet bottleneck)."""

    def __init__(self, in_chs, out_chs, stride, br, act, drop_path=0.0, group_size=0, attn=""):
        super().__init__()
        mid = make_divisible(out_chs * br)
        groups = mid // group_size if group_size else 1
        self.shortcut = _shortcut(in_chs, out_chs, stride)
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1, act_layer=act)
        self.conv2_kxk = ConvNormAct(mid, mid, 3, stride, groups=groups, act_layer=act)
        self.attn = _ATTN[attn](mid) if attn else nn.Identity()
        self.conv3_1x1 = ConvNormAct(mid, out_chs, 1, act_layer=None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.conv2_kxk(self.conv1_1x1(x)))
        return self.act(self.drop_path(self.conv3_1x1(y)) + self.shortcut(x))


@dataclass(frozen=True)
class HaloAttnCfg:
    """The :class:`~vitkit.layers.HaloAttention` arguments a network's attention blocks share."""

    block_size: int = 8  # query block side b
    halo_size: int = 3  # halo h
    num_heads: int = 8
    dim_head: int | None = None  # query/key head width; None: from the block width and value_ratio
    mask_padding: str = "size"  # 'size' (reference numerics) or 'all'; HaloNet sets it from its halo_mask


class SelfAttnBlock(nn.Module):
    """1x1 -> halo attention (stride) -> BN + act -> [SE] -> 1x1 (no act) + shortcut -> act.

    ``value_ratio`` (the paper's rv) widens the attention's value/output width relative to its query/key width.
    ``sa_attn`` adds channel attention after the attention's BN + act (the SE study); a stage's ``attn`` option
    is for its bottlenecks only, as in timm, whose attention blocks carry no SE/ECA.
    """

    def __init__(self, in_chs, out_chs, stride, br, act, drop_path, halo: HaloAttnCfg, value_ratio=1.0, sa_attn=""):
        super().__init__()
        mid = make_divisible(out_chs * br)
        v = int(mid * value_ratio)
        self.shortcut = _shortcut(in_chs, out_chs, stride)
        self.conv1_1x1 = ConvNormAct(in_chs, mid, 1, act_layer=act)
        self.self_attn = HaloAttention(
            mid,
            v,
            stride=stride,
            num_heads=halo.num_heads,
            dim_head=halo.dim_head,
            block_size=halo.block_size,
            halo_size=halo.halo_size,
            qk_ratio=1 / value_ratio,
            mask_padding=halo.mask_padding,
        )
        self.post_attn = BatchNormAct2d(v, act)
        self.attn = _ATTN[sa_attn](v) if sa_attn else nn.Identity()
        self.conv3_1x1 = ConvNormAct(v, out_chs, 1, act_layer=None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.post_attn(self.self_attn(self.conv1_1x1(x))))
        return self.act(self.drop_path(self.conv3_1x1(y)) + self.shortcut(x))


def make_stem(in_chans: int, stem: str, pool: bool, act: type[nn.Module]) -> nn.Sequential:
    """'7x7': one 7x7/2 conv (64); 'tiered': 3x3/2 (24) -> 3x3 (32) -> 3x3 (64). Then 3x3/2 max-pool, or, for
    'tiered' without pool, the last conv takes stride 2. Total stride 4 either way."""
    layers = OrderedDict()
    if stem == "7x7":
        layers["conv1"] = ConvNormAct(in_chans, 64, 7, 2, act_layer=act)
    else:
        chs, prev = (24, 32, 64), in_chans
        for i, c in enumerate(chs):
            stride = 2 if i == 0 or (i == 2 and not pool) else 1
            layers[f"conv{i + 1}"] = ConvNormAct(prev, c, 3, stride, act_layer=act)
            prev = c
    if pool:
        layers["pool"] = nn.MaxPool2d(3, 2, padding=1)
    return nn.Sequential(layers)


@dataclass(frozen=True)
class HaloStage:
    """One stage: its blocks in order ('b' bottleneck, 'sa' halo self-attention), width and stride (of its first
    block), and the options of its blocks."""

    blocks: tuple[str, ...]
    chs: int
    stride: int
    bottle_ratio: float = 0.25  # block width / output width (the paper's 1 / rb for the H models)
    attn: str = ""  # channel attention in the bottlenecks: '', 'se' or 'eca'
    group_size: int = 0  # channels per group of the bottlenecks' 3x3 conv (0: one group)
    value_ratio: float = 1.0  # the attention blocks' value width / query-key width (the paper's rv)
    sa_attn: str = ""  # channel attention after the attention blocks' BN + act: '' or 'se'
    num_heads: int | None = None  # the attention blocks' heads, when not the network's HaloAttnCfg

    def build(
        self, in_chs: int, act: type[nn.Module], drop_path: Iterator[float], halo: HaloAttnCfg
    ) -> list[nn.Module]:
        if self.num_heads is not None:
            halo = replace(halo, num_heads=self.num_heads)
        blocks, prev = [], in_chs
        for j, kind in enumerate(self.blocks):
            stride, br = self.stride if j == 0 else 1, self.bottle_ratio
            if kind == "b":
                blk = BottleneckBlock(prev, self.chs, stride, br, act, next(drop_path), self.group_size, self.attn)
            elif kind == "sa":
                blk = SelfAttnBlock(
                    prev, self.chs, stride, br, act, next(drop_path), halo, self.value_ratio, self.sa_attn
                )
            else:
                raise ValueError(f"HaloNet: block types are 'b' and 'sa', got {kind!r} in {self}")
            blocks.append(blk)
            prev = self.chs
        return blocks


class HaloNet(ConvStagesModel):
    """Stem + four stages of bottleneck / halo-attention blocks + optional final 1x1 conv + pooled head."""

    def __init__(
        self,
        stages: tuple[HaloStage, ...],
        stem: str = "7x7",
        stem_pool: bool = True,
        act: str = "relu",
        halo: HaloAttnCfg | dict | None = None,
        num_features: int = 0,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        img_size: int | tuple[int, int] = 256,
        halo_mask: str = "size",
    ):
        """
        Args:
            stages: one :class:`HaloStage` per stage.
            halo: the attention blocks' :class:`HaloAttnCfg` (or a dict of its fields).
            num_features: width of a final 1x1 conv (the paper's df); 0 for none.
            img_size: the default input size (of the data config); the network itself takes any size of at
                least ``min_input_size`` (32) pixels, and a smaller ``img_size`` is an error.
            halo_mask: 'size' (reference numerics) or 'all' (mask every key outside the map).
        """
        super().__init__()
        self.img_size = check_img_size(self.name, img_size, minimum=self.min_input_size)
        for st in stages:
            if not isinstance(st, HaloStage):
                raise ValueError(f"HaloNet: stages must be HaloStage entries, got {st!r}")
        halo = HaloAttnCfg(**halo) if isinstance(halo, dict) else (halo or HaloAttnCfg())
        halo = replace(halo, mask_padding=halo_mask)
        act_layer = {"relu": nn.ReLU, "silu": nn.SiLU}[act]
        self.num_classes, self.in_chans = num_classes, in_chans
        self.stem = make_stem(in_chans, stem, stem_pool, act_layer)
        dpr = iter(drop_path_schedule(drop_path_rate, sum(len(s.blocks) for s in stages)))
        prev, reduction = 64, 4
        built = []
        self.feature_info = FeatureInfo()
        for i, st in enumerate(stages):
            built.append(nn.Sequential(*st.build(prev, act_layer, dpr, halo)))
            prev = st.chs
            reduction *= st.stride
            self.feature_info.append(dict(num_chs=st.chs, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*built)
        self._build_tail(
            prev, num_features, num_classes, drop_rate, lambda i, o: ConvNormAct(i, o, 1, act_layer=act_layer)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and not name.endswith(("self_attn.q", "self_attn.kv")):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)


# ---- variants ---------------------------------------------------------------------------------
# The paper's H0-H7 (ARCHITECTURES.md §2.2): b, h, rv, rb, l3, df, image size
PAPER = {
    "h0": (8, 3, 1.0, 0.5, 7, 0, 256),
    "h1": (8, 3, 1.0, 1.0, 10, 0, 256),
    "h2": (8, 3, 1.0, 1.25, 11, 0, 256),
    "h3": (10, 3, 1.0, 1.5, 12, 1024, 320),
    "h4": (12, 2, 1.0, 3.0, 12, 1280, 384),
    "h5": (14, 2, 2.5, 2.0, 23, 1536, 448),
    "h6": (8, 4, 3.0, 2.75, 24, 1536, 512),
    "h7": (10, 3, 4.0, 3.5, 26, 2048, 600),
}


def _paper_args(b, h, rv, rb, l3, df, img):
    stages = tuple(
        HaloStage(("sa",) * d, int(64 * 2**i * rb), 1 if i == 0 else 2, bottle_ratio=1 / rb, value_ratio=rv)
        for i, d in enumerate((3, 3, l3, 3))
    )
    return dict(stages=stages, stem="7x7", halo=HaloAttnCfg(block_size=b, halo_size=h), num_features=df)


def _interleave(n: int, every: int = 1, first: str = "b") -> tuple[str, ...]:
    """timm's interleave_blocks: a self-attention block after every ``every`` bottlenecks (1-based)."""
    return tuple("sa" if (i + 1) % (every + 1) == 0 else first for i in range(n))


TIMM = {
    "halonet26t": dict(
        stages=(
            HaloStage(("b", "b"), 256, 1),
            HaloStage(("b", "b"), 512, 2),
            HaloStage(("b", "sa"), 1024, 2),
            HaloStage(("sa", "sa"), 2048, 2),
        ),
        stem="tiered",
        halo=HaloAttnCfg(block_size=8, halo_size=2),
    ),
    "sehalonet33ts": dict(
        stages=(
            HaloStage(("b", "b"), 256, 1, attn="se"),
            HaloStage(("b", "b", "sa"), 512, 2, attn="se"),
            HaloStage(("b", "b", "sa"), 1024, 2, attn="se"),
            HaloStage(("sa", "sa"), 1536, 2, bottle_ratio=0.333),
        ),
        stem="tiered",
        stem_pool=False,
        act="silu",
        num_features=1280,
        halo=HaloAttnCfg(block_size=8, halo_size=3),
    ),
    "halonet50ts": dict(
        stages=(
            HaloStage(("b",) * 3, 256, 1),
            HaloStage(("b", "b", "b", "sa"), 512, 2, num_heads=4),
            HaloStage(("b", "sa") * 3, 1024, 2),
            HaloStage(("b", "sa", "b"), 2048, 2),
        ),
        stem="tiered",
        act="silu",
        halo=HaloAttnCfg(block_size=8, halo_size=3),
    ),
    "eca_halonext26ts": dict(
        stages=(
            HaloStage(("b", "b"), 256, 1, attn="eca", group_size=16),
            HaloStage(("b", "b"), 512, 2, attn="eca", group_size=16),
            HaloStage(("b", "sa"), 1024, 2, attn="eca", group_size=16),
            HaloStage(("sa", "sa"), 2048, 2),
        ),
        stem="tiered",
        act="silu",
        halo=HaloAttnCfg(block_size=8, halo_size=2, dim_head=16),
    ),
}
_TIMM_TAGS = {
    "halonet26t": "a1h_in1k",
    "sehalonet33ts": "ra2_in1k",
    "halonet50ts": "a1h_in1k",
    "eca_halonext26ts": "c1_in1k",
}

# the paper's controlled study: ResNet-50 with every 3x3 conv replaced by halo attention (block 8, halo 3)
STUDY = {
    f"halo_{prefix}resnet50": dict(
        stages=tuple(
            HaloStage(("sa",) * d, c, 1 if i == 0 else 2, sa_attn=attn)
            for i, (d, c) in enumerate(zip((3, 4, 6, 3), (256, 512, 1024, 2048)))
        ),
        stem="7x7",
        halo=HaloAttnCfg(block_size=8, halo_size=3),
    )
    for prefix, attn in (("", ""), ("se", "se"))
}


def _register(name: str, args: dict, img: int, crop_pct: float, tag: str | None) -> None:
    cfg = default_cfg(
        input_size=(3, img, img),
        crop_pct=crop_pct,
        first_conv="stem.conv1.conv",
        classifier="head.fc",
        test_input_size=(3, 64, 64),
    )
    pretrained = (
        [
            PretrainedCfg(
                tag=tag,
                hf_hub_id=f"timm/{name}.{tag}",
                input_size=(3, img, img),
                crop_pct=crop_pct,
                license="apache-2.0",
            )
        ]
        if tag
        else []
    )
    register_variant(name, HaloNet, dict(args, img_size=img), family="halonet", cfg=cfg, pretrained=pretrained)


for _k, _v in PAPER.items():
    _register(f"halonet_{_k}", _paper_args(*_v), _v[-1], 0.95, None)
for _k, _v in TIMM.items():
    _register(_k, _v, 256, 0.94, _TIMM_TAGS.get(_k))
for _k, _v in STUDY.items():
    _register(_k, _v, 224, 0.875, None)
