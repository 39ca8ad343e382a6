"""``features_only`` wrapper: a backbone that returns the NCHW maps listed in ``feature_info``."""

from __future__ import annotations

import torch
from torch import nn

from vitkit.models._base import FeatureInfo, feature_take_indices


class FeatureGetterNet(nn.Module):
    """Wraps any vitkit model and returns ``forward_intermediates`` maps for ``out_indices``.

    The wrapped model's classifier is removed, so no unused parameters are left behind.
    """

    def __init__(self, model: nn.Module, out_indices: int | list[int] | tuple[int, ...] | None = None):
        super().__init__()
        if out_indices is None:
            out_indices = getattr(model, "default_out_indices", None)
        self.out_indices, _ = feature_take_indices(len(model.feature_info), out_indices)
        self.feature_info = FeatureInfo(model.feature_info[i] for i in self.out_indices)
        model.prune_intermediate_layers(self.out_indices)
        self.model = model
        self.model_name = getattr(model, "model_name", "")
        self.pretrained_cfg = getattr(model, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
