"""Any registered backbone as a feature pyramid for dense heads (segmentation, detection).

:class:`PyramidBackbone` builds the backbone with ``features_only`` and returns one NCHW map per requested
stride (default 4, 8, 16, 32):

* a hierarchical backbone (LaViT, HaloNet, NesT, MobileViT, ResNet hybrids) gives each stride from the last stage
  at that reduction (``feature_info``); strides coarser than its coarsest stage come from 2x max pooling of the
  coarsest map (NesT-T stops at 16);
* a single-scale backbone (a plain ViT: every block at stride 16) gives its last block's map to ViTDet's
  :class:`~vitkit.layers.fpn.SimpleFeaturePyramid` (transposed convolutions up, max pooling down).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.fpn import SimpleFeaturePyramid
from vitkit.models._builder import create_model


class PyramidBackbone(nn.Module):
    """``forward(x)`` -> maps at ``strides`` (finest first); ``channels`` gives their widths."""

    def __init__(
        self,
        name: str,
        strides: tuple[int, ...] = (4, 8, 16, 32),
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        **kwargs,
    ):
        super().__init__()
        with torch.device("meta"):
            probe = create_model(name, **kwargs)
        info = list(probe.feature_info)
        reductions = [f["reduction"] for f in info]
        self.name, self.strides, self.simple = name, tuple(strides), None
        self.pretrained_cfg = dict(probe.pretrained_cfg)
        self.in_chans = probe.in_chans
        if len(set(reductions)) == 1:  # plain ViT: one stride for every block
            s, last = reductions[-1], len(info) - 1
            scales = tuple(t / s for t in self.strides)
            self.body = create_model(name, features_only=True, out_indices=(last,), pretrained=pretrained,
                                     checkpoint_path=checkpoint_path, **kwargs)  # fmt: skip
            self.simple = SimpleFeaturePyramid(info[last]["num_chs"], scales)
            self.channels = list(self.simple.out_channels)
            return
        take, self.sources = [], []  # sources: (index into the taken maps, extra 2x poolings)
        for t in self.strides:
            at = [i for i, r in enumerate(reductions) if r == t]
            if at:
                take.append(at[-1])
                self.sources.append((at[-1], 0))
            elif t > max(reductions) and (t // max(reductions)) & (t // max(reductions) - 1) == 0:
                coarsest = max(range(len(info)), key=lambda i: (reductions[i], i))
                take.append(coarsest)
                self.sources.append((coarsest, (t // max(reductions)).bit_length() - 1))
            else:
                raise ValueError(
                    f"PyramidBackbone: {name} has no stride-{t} features (its stages: {sorted(set(reductions))})"
                )
        self.out_indices = sorted(set(take))
        self.body = create_model(name, features_only=True, out_indices=self.out_indices, pretrained=pretrained,
                                 checkpoint_path=checkpoint_path, **kwargs)  # fmt: skip
        self.channels = [info[i]["num_chs"] for i, _ in self.sources]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.body(x)
        if self.simple is not None:
            return self.simple(maps[-1])
        out = []
        for i, pools in self.sources:
            m = maps[self.out_indices.index(i)]
            for _ in range(pools):
                m = F.max_pool2d(m, 2, ceil_mode=True)
            out.append(m)
        return out
