"""Segmentation models: Semantic-FPN on any backbone (LaViT's segmentation setting).

Semantic-FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019, arXiv:1901.02446), the semantic
branch used alone, as in mmsegmentation's ``FPNHead`` configs that LaViT, PVT and Swin report on ADE20K:
backbone maps at strides 4/8/16/32 (:class:`~vitkit.models._pyramid.PyramidBackbone`), an FPN to 256 channels,
then per level ``k`` (stride ``4 * 2^k``) ``max(1, k)`` stages of 3x3 conv (128) + GroupNorm(32) + ReLU, each but
the stride-4 level's followed by 2x bilinear upsampling, so every level reaches stride 4; the levels are summed,
dropped out (0.1) and classified by a 1x1 convolution. The forward returns logits at stride 4 (the head's
output stride); :func:`~vitkit.tasks.segmentation.metrics.upsample_logits` brings them to the input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.fpn import FPN
from vitkit.models._pyramid import PyramidBackbone
from vitkit.models._registry import default_cfg, get_model_entry, register_model


class SegmentationModel(nn.Module):
    """What every segmentation model shares: ``num_classes``, ``reset_classifier`` (a new 1x1 classifier),
    ``in_chans`` and ``no_weight_decay`` (the backbone's, prefixed)."""

    classifier: nn.Conv2d
    backbone: nn.Module
    output_stride: int = 4

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(self.classifier.in_channels, num_classes, 1)

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "body", self.backbone)
        inner = getattr(inner, "model", inner)
        skip = inner.no_weight_decay() if hasattr(inner, "no_weight_decay") else set()
        prefix = "backbone.body.model." if hasattr(self.backbone, "body") else "backbone."
        return {prefix + k for k in skip}


def conv_gn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(32, cout), nn.ReLU(inplace=True))


class SemanticFPN(SegmentationModel):
    """Semantic-FPN: ``model(x)`` -> logits ``(B, num_classes, H/4, W/4)``."""

    def __init__(
        self,
        backbone: str = "lavit_tiny",
        num_classes: int = 150,
        in_chans: int = 3,
        img_size: int | tuple[int, int] | None = None,
        drop_path_rate: float = 0.0,
        fpn_channels: int = 256,
        head_channels: int = 128,
        drop_rate: float = 0.1,
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        kw = dict(backbone_kwargs or {}, in_chans=in_chans, drop_path_rate=drop_path_rate)
        if img_size is not None:  # every family takes it (the default input size; ViT sizes its pos-embed by it)
            kw["img_size"] = img_size
        self.backbone = PyramidBackbone(backbone, (4, 8, 16, 32), **kw)
        self.fpn = FPN(self.backbone.channels, fpn_channels)
        heads = []
        for k in range(4):  # stride 4 * 2^k -> stride 4
            stages = []
            for j in range(max(1, k)):
                stages.append(conv_gn_relu(fpn_channels if j == 0 else head_channels, head_channels))
                if k > 0:
                    stages.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            heads.append(nn.Sequential(*stages))
        self.scale_heads = nn.ModuleList(heads)
        self.dropout = nn.Dropout2d(drop_rate)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.num_classes, self.in_chans = num_classes, in_chans
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.fpn(self.backbone(x))
        y = self.scale_heads[0](feats[0])
        for head, f in zip(self.scale_heads[1:], feats[1:]):
            # levels agree to a pixel when the input divides by 32; otherwise bring them to stride 4's size
            y = y + F.interpolate(head(f), size=y.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(y))


# ---- registrations ------------------------------------------------------------------------------------
SEMFPN_BACKBONES = ("lavit_tiny", "lavit_small", "halonet26t", "nest_tiny", "mobilevit_s", "vit_small_patch16_224")


def _seg_cfg(backbone: str, size: int = 512) -> dict:
    b = get_model_entry(backbone).default_cfg
    return default_cfg(
        task="segmentation",
        input_size=(3, size, size),
        test_input_size=(3, 64, 64),
        mean=b["mean"],
        std=b["std"],
        interpolation="bilinear",
        crop_pct=1.0,
        first_conv=None,
        classifier="classifier",
    )


@register_model(family="semfpn", cfg=_seg_cfg("lavit_tiny"))
def semfpn(backbone: str = "lavit_tiny", **kwargs) -> SemanticFPN:
    """Semantic-FPN on any registered backbone: ``create_model("semfpn", backbone="halonet26t", num_classes=21)``.
    (The data config's mean/std are LaViT's; the registered ``semfpn_<backbone>`` names carry their backbone's.)"""
    return SemanticFPN(backbone, **kwargs)


def _register_semfpn(backbone: str) -> None:
    def builder(**kwargs) -> SemanticFPN:
        return SemanticFPN(backbone, **kwargs)

    builder.__name__ = builder.__qualname__ = f"semfpn_{backbone.removesuffix('_patch16_224')}"
    builder.__doc__ = f"Semantic-FPN on {backbone}."
    register_model(builder, family="semfpn", cfg=_seg_cfg(backbone))


for _b in SEMFPN_BACKBONES:
    _register_semfpn(_b)
