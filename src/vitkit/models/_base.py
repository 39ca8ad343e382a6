"""The contract every vitkit model implements (the timm model API).

``forward_features(x)`` -> unpooled features (tokens ``[B, N, C]`` for ViT, NCHW maps otherwise);
``forward_head(x, pre_logits=False)``; ``forward(x)``; ``forward_intermediates(x, indices, ...)``;
``reset_classifier(num_classes)``; ``num_features``; ``feature_info``; ``set_grad_checkpointing``;
``no_weight_decay()``; and the data config in ``pretrained_cfg``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers import ClassifierHead
from vitkit.models._registry import resolve_data_config


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

    drop_rate: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Default head for NCHW features: global average pool -> dropout -> ``head`` (a Linear)."""
        x = F.dropout(x.mean(dim=(2, 3)), p=self.drop_rate, training=self.training)  # (B, C)
        return x if pre_logits else self.head(x)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the Linear ``head`` (``num_classes=0``: an identity, so ``forward`` gives pooled features)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward instead of storing them (saves memory in training)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return set()

    def get_classifier(self) -> nn.Module:
        return self.head

    @property
    def data_config(self) -> dict[str, Any]:
        """The preprocessing this model expects; same as :func:`vitkit.resolve_data_config`."""
        return resolve_data_config(self)

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

    def plan_intermediates(
        self, n: int, indices, output_fmt: str, stop_early: bool, intermediates_only: bool, formats=("NCHW",)
    ) -> tuple[list[int], int]:
        """Validate ``forward_intermediates`` arguments: the stages to take and the last one to run."""
        if output_fmt not in formats:
            raise ValueError(f"{self.name}: output_fmt must be one of {formats}, got {output_fmt!r}")
        take, last = feature_take_indices(n, indices)
        return take, (last if (stop_early or intermediates_only) else n - 1)

    def run_blocks(self, blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run a sequence of blocks, with activation checkpointing when enabled and training."""
        return run_blocks(blocks, x, self.grad_checkpointing and self.training)


class ConvStagesModel(VitkitModel):
    """The body shared by the convolution-led families (MobileViT, HaloNet): ``stem`` -> ``stages`` (each a
    sequence of blocks) -> ``final_conv`` -> ``head`` (a pooled :class:`~vitkit.layers.ClassifierHead`).

    Subclasses build those four modules and ``feature_info`` (one entry per stage). Any input with sides of at
    least ``min_input_size`` pixels is accepted; the families document how they handle sides that do not divide.
    """

    min_input_size: int = 32

    def _build_tail(self, prev: int, num_features: int, num_classes: int, drop_rate: float, final_conv) -> None:
        """``final_conv`` (when ``num_features``) and the classifier head."""
        if num_features:
            self.final_conv = final_conv(prev, num_features)
            self.num_features = num_features
        else:
            self.final_conv = nn.Identity()
            self.num_features = prev
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, (1, 1))
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"{self.name}: input sides must be at least {self.min_input_size} pixels, got {tuple(x.shape[-2:])}"
            )
        return self.stem(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        for stage in self.stages:
            x = self.run_blocks(stage, x)
        return self.final_conv(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs as NCHW maps (reductions as in ``feature_info``)."""
        take, last = self.plan_intermediates(len(self.stages), indices, output_fmt, stop_early, intermediates_only)
        x = self._stem(x)
        out = []
        for i, stage in enumerate(self.stages[: last + 1]):
            x = self.run_blocks(stage, x)
            if i in take:
                out.append(x)
        if intermediates_only:
            return out
        return self.final_conv(x), out

    def prune_intermediate_layers(self, indices: int | list[int] | None = None) -> list[int]:
        take, last = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: last + 1]
        self.final_conv = nn.Identity()
        self.reset_classifier(0)
        return take
