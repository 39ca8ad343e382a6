"""Feature pyramids for dense heads: the FPN (Lin et al., 2017) and ViTDet's simple feature pyramid.

* :class:`FPN`: lateral 1x1 convolutions, a top-down path (nearest 2x upsampling + add) and 3x3 output
  convolutions, all to ``out_channels``; ``extra_levels`` more stride-2 3x3 convolutions on top (RetinaNet's P6
  from the coarsest input map and P7 = conv(ReLU(P6)), as in its paper and mmdetection's
  ``add_extra_convs='on_input'``).
* :class:`SimpleFeaturePyramid`: Li et al. 2022 (ViTDet): a plain ViT's single stride-16 map turned into strides
  4/8/16/32 by two or one 2x transposed convolutions (LayerNorm + GELU between), identity, or 2x max pooling; the
  FPN's lateral convolutions then project every level to the same width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FPN(nn.Module):
    """``[C_i]`` maps, finest first (each half the size of the previous) -> ``[P_i]`` + ``extra_levels`` coarser
    maps, all with ``out_channels``."""

    def __init__(self, in_channels: list[int], out_channels: int = 256, extra_levels: int = 0):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        chs = [in_channels[-1]] + [out_channels] * (extra_levels - 1)
        self.extra = nn.ModuleList(nn.Conv2d(c, out_channels, 3, stride=2, padding=1) for c in chs[:extra_levels])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):  # top-down: coarse to fine
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.output, lat)]
        x = feats[-1]
        for i, conv in enumerate(self.extra):
            x = conv(x if i == 0 else F.relu(x))
            outs.append(x)
        return outs


class SimpleFeaturePyramid(nn.Module):
    """One stride-``s`` map -> maps at ``s * f`` for each factor ``f`` in ``scales`` (0.25, 0.5, 1, 2)."""

    def __init__(self, channels: int, scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)):
        super().__init__()
        self.scales = tuple(scales)
        self.out_channels = []
        stages = []
        for f in self.scales:
            if f == 0.25:
                c = channels // 4
                stage = nn.Sequential(
                    nn.ConvTranspose2d(channels, channels // 2, 2, stride=2),
                    LayerNorm2d(channels // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(channels // 2, c, 2, stride=2),
                )
            elif f == 0.5:
                c, stage = channels // 2, nn.ConvTranspose2d(channels, channels // 2, 2, stride=2)
            elif f == 1.0:
                c, stage = channels, nn.Identity()
            elif f == 2.0:
                c, stage = channels, nn.MaxPool2d(2)
            else:
                raise ValueError(f"SimpleFeaturePyramid: scale {f} is not one of 0.25, 0.5, 1, 2")
            stages.append(stage)
            self.out_channels.append(c)
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [stage(x) for stage in self.stages]
