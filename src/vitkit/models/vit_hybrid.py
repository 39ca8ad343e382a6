"""Hybrid ViT: a ResNet stem (weight-standardised convs + GroupNorm) feeding a ViT (ViT paper §3.1, §1.6).

Paper: Dosovitskiy et al., ICLR 2021 (arXiv 2010.11929), "Hybrid Architecture"; official configs in
google-research/vision_transformer (``get_r50_b16_config``: ResNet root + (3, 4, 9) bottleneck units so the
map has stride 16, then a 1x1 "patch" projection).
Reference implementation: timm ``vision_transformer_hybrid.py`` + ``resnetv2.py`` (non pre-activation
bottlenecks, ``StdConv2dSame`` with eps 1e-8, TF-'SAME' padding, GroupNorm(32)); parameter names match
it so timm checkpoints load unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from vitkit.layers import GroupNormAct, MaxPool2dSame, StdConv2dSame, to_2tuple
from vitkit.models._registry import INCEPTION_MEAN, INCEPTION_STD, PretrainedCfg, default_cfg, register_model
from vitkit.models.vit import HEADLESS_TAGS, VisionTransformer, checkpoint_filter_fn

StdConv = partial(StdConv2dSame, eps=1e-8)


class Bottleneck(nn.Module):
    """Post-activation bottleneck (ResNet v1.5: stride on the 3x3) with StdConv + GroupNorm."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, downsample: bool = False):
        super().__init__()
        mid = out_chs // 4
        self.downsample = DownsampleConv(in_chs, out_chs, stride) if downsample else None
        self.conv1 = StdConv(in_chs, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv(mid, out_chs, 1)
        self.norm3 = GroupNormAct(out_chs, apply_act=False)
        self.act3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.act3(x + shortcut)


class DownsampleConv(nn.Module):
    """1x1 (strided) projection shortcut + GroupNorm without activation."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv = StdConv(in_chs, out_chs, 1, stride=stride)
        self.norm = GroupNormAct(out_chs, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class ResNetStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, depth: int):
        super().__init__()
        self.blocks = nn.Sequential(
            *[Bottleneck(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, i == 0) for i in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def resnet_stem(in_chans: int, width: int = 64) -> nn.Sequential:
    """7x7/2 StdConv -> GroupNorm + ReLU -> 3x3/2 max-pool, all with TF-'SAME' padding (stride 4)."""
    layers = [
        ("conv", StdConv(in_chans, width, 7, stride=2)),
        ("norm", GroupNormAct(width)),
        ("pool", MaxPool2dSame(3, 2)),
    ]
    return nn.Sequential(OrderedDict(layers))


class ResNetV2Backbone(nn.Module):
    """The hybrid's CNN: stem + post-activation bottleneck stages (channels 256, 512, 1024, 2048)."""

    def __init__(self, layers: tuple[int, ...], in_chans: int = 3, channels=(256, 512, 1024, 2048)):
        super().__init__()
        self.stem = resnet_stem(in_chans)
        prev = 64
        stages = []
        for i, depth in enumerate(layers):
            stages.append(ResNetStage(prev, channels[i], 1 if i == 0 else 2, depth))
            prev = channels[i]
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.reduction = 4 * 2 ** max(len(layers) - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class HybridEmbed(nn.Module):
    """CNN feature map -> ``patch_size`` conv projection -> tokens ``[B, N, C]``."""

    def __init__(self, backbone: nn.Module, img_size=224, patch_size=1, in_chans=3, embed_dim=768):
        super().__init__()
        self.backbone = backbone
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        r = backbone.reduction
        self.reduction = (r * self.patch_size[0], r * self.patch_size[1])
        self.grid_size = (self.img_size[0] // self.reduction[0], self.img_size[1] // self.reduction[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(backbone.num_features, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2)  # (B, N, C)


class StemOnly(nn.Sequential):
    """The ResNet root alone (``layers=()``), used by the R+Ti/16 hybrids with 8x8 patches."""

    def __init__(self, in_chans: int):
        super().__init__(OrderedDict(resnet_stem(in_chans).named_children()))
        self.num_features = 64
        self.reduction = 4


def _backbone(layers: tuple[int, ...], in_chans: int) -> nn.Module:
    return ResNetV2Backbone(layers, in_chans) if layers else StemOnly(in_chans)


# name: (resnet layers, patch, embed_dim, depth, heads, img)   [timm vision_transformer_hybrid.py]
HYBRID_VARIANTS = {
    "vit_tiny_r_s16_p8_224": ((), 8, 192, 12, 3, 224),
    "vit_tiny_r_s16_p8_384": ((), 8, 192, 12, 3, 384),
    "vit_small_r26_s32_224": ((2, 2, 2, 2), 1, 384, 12, 6, 224),
    "vit_small_r26_s32_384": ((2, 2, 2, 2), 1, 384, 12, 6, 384),
    "vit_base_r26_s32_224": ((2, 2, 2, 2), 1, 768, 12, 12, 224),
    "vit_base_r50_s16_224": ((3, 4, 9), 1, 768, 12, 12, 224),
    "vit_base_r50_s16_384": ((3, 4, 9), 1, 768, 12, 12, 384),
    "vit_large_r50_s32_224": ((3, 4, 6, 3), 1, 1024, 24, 16, 224),
    "vit_large_r50_s32_384": ((3, 4, 6, 3), 1, 1024, 24, 16, 384),
}

_HYBRID_TAGS = {
    "vit_tiny_r_s16_p8_224": "augreg_in21k_ft_in1k",
    "vit_tiny_r_s16_p8_384": "augreg_in21k_ft_in1k",
    "vit_small_r26_s32_224": "augreg_in21k_ft_in1k",
    "vit_small_r26_s32_384": "augreg_in21k_ft_in1k",
    "vit_base_r50_s16_224": "orig_in21k",
    "vit_base_r50_s16_384": "orig_in21k_ft_in1k",
    "vit_large_r50_s32_224": "augreg_in21k_ft_in1k",
    "vit_large_r50_s32_384": "augreg_in21k_ft_in1k",
}


def _register(name: str, layers, patch: int, dim: int, depth: int, heads: int, img: int) -> None:
    def builder(**kwargs) -> VisionTransformer:
        in_chans = kwargs.get("in_chans", 3)
        embed = partial(HybridEmbed, _backbone(layers, in_chans))
        args = dict(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, embed_layer=embed)
        args.update(kwargs)
        return VisionTransformer(**args)

    builder.__name__ = builder.__qualname__ = name
    stride = (4 * 2 ** max(len(layers) - 1, 0)) * patch
    first = "patch_embed.backbone.stem.conv" if layers else "patch_embed.backbone.conv"
    cfg = default_cfg(
        input_size=(3, img, img),
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        first_conv=first,
        test_input_size=(3, 2 * stride, 2 * stride),
    )
    tag = _HYBRID_TAGS.get(name)
    pretrained = (
        [
            PretrainedCfg(
                tag=tag,
                hf_hub_id=f"timm/{name}.{tag}",
                num_classes=0 if tag in HEADLESS_TAGS else 1000,
                input_size=(3, img, img),
                mean=INCEPTION_MEAN,
                std=INCEPTION_STD,
                crop_pct=1.0 if img == 384 else 0.9,
                license="apache-2.0",
            )
        ]
        if tag
        else []
    )
    register_model(builder, family="vit_hybrid", cfg=cfg, pretrained=pretrained, checkpoint_filter=checkpoint_filter_fn)


for _name, _spec in HYBRID_VARIANTS.items():
    _register(_name, *_spec)
