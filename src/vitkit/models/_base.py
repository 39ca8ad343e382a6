"""The contract every vitkit model implements (the timm model API).

``forward_features(x)`` -> unpooled features (tokens ``[B, N, C]`` for ViT, NCHW maps otherwise);
``forward_head(x, pre_logits=False)``; ``forward(x)``; ``forward_intermediates(x, indices, ...)``;
``reset_classifier(num_classes)``; ``num_features``; ``feature_info``; ``set_grad_checkpointing``;
``no_weight_decay()``; and the data config in ``pretrained_cfg``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FeatureInfo(list):
    """A list of ``{"num_chs", "reduction", "module"}`` dicts, one per feature stage."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


def feature_take_indices(num_features: int, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
    """Resolve ``indices`` (an int n -> the last n; a list, negatives allowed) to sorted absolute indices.

    Returns the indices and the largest one, so a caller can stop early.
    """
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices: asked for the last {indices} of {num_features} feature stages")
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            j = i + num_features if i < 0 else i
            if not 0 <= j < num_features:
                raise ValueError(f"indices: {i} is out of range for {num_features} feature stages")
            take.append(j)
        take = sorted(set(take))
    return take, max(take)


def run_blocks(blocks, x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
    """Run blocks in sequence; with ``checkpointing`` their activations are recomputed in backward."""
    for blk in blocks:
        if checkpointing:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


class VitkitModel(nn.Module):
    """Base class: shared helpers for the model contract. Families implement the forward methods."""

    model_name: str = ""
    pretrained_cfg: dict[str, Any]
    num_classes: int
    num_features: int
    feature_info: FeatureInfo
    grad_checkpointing: bool = False
    in_chans: int = 3

    @property
    def name(self) -> str:
        return self.model_name or type(self).__name__

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward instead of storing them (saves memory in training)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return set()

    def get_classifier(self) -> nn.Module:
        return self.head

    @property
    def data_config(self) -> dict[str, Any]:
        keys = ("input_size", "mean", "std", "interpolation", "crop_pct")
        return {k: self.pretrained_cfg[k] for k in keys}

    def check_input(self, x: torch.Tensor, multiple: tuple[int, int], fixed: tuple[int, int] | None = None) -> None:
        """Raise a ValueError naming the model when ``x`` cannot be processed.

        Args:
            x: the NCHW input.
            multiple: height and width must be multiples of these.
            fixed: when set, the only accepted (height, width).
        """
        if x.ndim != 4:
            raise ValueError(f"{self.name}: expected a 4-D NCHW image batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"{self.name}: expected {self.in_chans} input channels (in_chans={self.in_chans}), "
                f"got {x.shape[1]} in input of shape {tuple(x.shape)}"
            )
        h, w = int(x.shape[2]), int(x.shape[3])
        if fixed is not None and (h, w) != tuple(fixed):
            raise ValueError(
                f"{self.name}: expected input size {fixed[0]}x{fixed[1]} (img_size), got {h}x{w}; "
                f"create the model with img_size=({h}, {w}) or dynamic_img_size=True"
            )
        if h % multiple[0] or w % multiple[1]:
            raise ValueError(
                f"{self.name}: input height and width must be multiples of {multiple[0]}x{multiple[1]}, got {h}x{w}"
            )

    def run_blocks(self, blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run a sequence of blocks, with activation checkpointing when enabled and training."""
        return run_blocks(blocks, x, self.grad_checkpointing and self.training)
