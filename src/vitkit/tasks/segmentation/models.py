"""Segmentation models: Semantic-FPN on any backbone (LaViT's setting) and DeepLabv3 on MobileViT (the paper's).

DeepLabv3 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", arXiv:1706.05587) as
ml-cvnets (v0.1, the MobileViT paper's runs) and transformers' ``MobileViTForSemanticSegmentation`` build it: the
MobileViT backbone at output stride 16 (the last stage's downsampling inverted residual takes stride 1; nothing
is dilated at OS16, as in both references) without its final 1x1 expansion; ASPP with 256 channels: a 1x1
branch, three 3x3 branches at dilation 6/12/18, image pooling (average -> 1x1 -> bilinear upsampling), each conv
+ BN + ReLU, projected by a 1x1 conv + BN + ReLU and dropout 0.1; then Dropout2d(0.1) and a 1x1 classifier with
bias. The forward returns logits at stride 16, as transformers does. Parameter names follow transformers'
structure (``aspp.convs.0-3``, ``aspp.pool``, ``aspp.project``, ``classifier``), and a transformers checkpoint
(``mobilevit.*`` + ``segmentation_head.*``) converts on load (:func:`checkpoint_filter_fn`).

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

from vitkit.layers.conv_bn import ConvNormAct
from vitkit.layers.fpn import FPN
from vitkit.models._builder import create_model
from vitkit.models._hf import rename, strip_prefix
from vitkit.models._pyramid import PyramidBackbone
from vitkit.models._registry import default_cfg, get_model_entry, register_model
from vitkit.models.mobilevit import hf_to_vitkit as mobilevit_from_hf


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
        img_size: int | tuple[int, int] = 512,
        drop_path_rate: float = 0.0,
        fpn_channels: int = 256,
        head_channels: int = 128,
        drop_rate: float = 0.1,
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        kw = dict(backbone_kwargs or {}, in_chans=in_chans, drop_path_rate=drop_path_rate)
        kw["img_size"] = img_size  # every family takes it (the default input size; ViT sizes its pos-embed by it)
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


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pooling branch, concatenated and
    projected; every conv + BN + ReLU."""

    def __init__(self, in_chs: int, out_chs: int = 256, rates: tuple[int, ...] = (6, 12, 18), drop: float = 0.1):
        super().__init__()
        self.convs = nn.ModuleList(
            [ConvNormAct(in_chs, out_chs, 1)] + [ConvNormAct(in_chs, out_chs, 3, dilation=r) for r in rates]
        )
        self.pool = ConvNormAct(in_chs, out_chs, 1)  # on the globally averaged map
        self.project = ConvNormAct((len(rates) + 2) * out_chs, out_chs, 1)
        self.dropout = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = [conv(x) for conv in self.convs]
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        ys.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.dropout(self.project(torch.cat(ys, 1)))


class DeepLabV3(SegmentationModel):
    """DeepLabv3 on a MobileViT backbone at output stride 16: ``model(x)`` -> logits ``(B, num_classes, H/16, W/16)``.

    ``forward_features`` is the backbone's last map, ``forward_head(f, pre_logits=True)`` the ASPP output.
    """

    output_stride = 16

    def __init__(
        self,
        backbone: str = "mobilevit_s",
        num_classes: int = 21,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 512,
        drop_path_rate: float = 0.0,
        aspp_channels: int = 256,
        rates: tuple[int, ...] = (6, 12, 18),
        drop_rate: float = 0.1,
    ):
        super().__init__()
        kw = dict(in_chans=in_chans, drop_path_rate=drop_path_rate, output_stride=16, num_features=0)
        kw["img_size"] = img_size  # the backbone is built for the model's input size
        with torch.device("meta"):
            n = len(create_model(backbone, **kw).feature_info)
        self.backbone = create_model(backbone, features_only=True, out_indices=(n - 1,), **kw)
        chs = self.backbone.feature_info[-1]["num_chs"]
        self.aspp = ASPP(chs, aspp_channels, tuple(rates), drop_rate)
        self.dropout = nn.Dropout2d(drop_rate)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)
        self.num_classes, self.in_chans = num_classes, in_chans

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.aspp(x)
        return x if pre_logits else self.classifier(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: DeepLabV3) -> dict[str, torch.Tensor]:
    """A transformers ``MobileViTForSemanticSegmentation`` state dict (``mobilevit.*``, ``segmentation_head.*``)
    converted to this layout; a vitkit one passes unchanged."""
    if not any(k.startswith("segmentation_head.") for k in state_dict):
        return state_dict
    backbone = {k: v for k, v in state_dict.items() if k.startswith("mobilevit.")}
    head = strip_prefix({k: v for k, v in state_dict.items() if k.startswith("segmentation_head.")},
                        "segmentation_head.")  # fmt: skip
    head = rename(head, [(r"^aspp\.convs\.4\.conv_1x1\.", "aspp.pool."), (r"^aspp\.project\.", "aspp.project."),
                         (r"^classifier\.convolution\.", "classifier."), (r"\.convolution\.", ".conv."),
                         (r"\.normalization\.", ".bn.")])  # fmt: skip
    out = {f"backbone.model.{k}": v for k, v in mobilevit_from_hf(backbone).items()}
    out.update(head)
    return out


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


def _register_deeplab(variant: str) -> None:
    backbone = f"mobilevit_{variant}"

    def builder(**kwargs) -> DeepLabV3:
        return DeepLabV3(backbone, **kwargs)

    builder.__name__ = builder.__qualname__ = f"deeplabv3_{backbone}"
    builder.__doc__ = f"DeepLabv3 on {backbone} at output stride 16 (MobileViT paper, PASCAL VOC: 21 classes)."
    cfg = dict(_seg_cfg(backbone), test_input_size=(3, 64, 64))
    register_model(builder, family="deeplabv3", cfg=cfg, checkpoint_filter=checkpoint_filter_fn)


for _v in ("xxs", "xs", "s"):
    _register_deeplab(_v)
