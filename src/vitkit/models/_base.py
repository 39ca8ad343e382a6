"""The contract every vitkit model implements (the timm model API).

``forward_features(x)`` -> unpooled features (tokens ``[B, N, C]`` for ViT, NCHW maps otherwise);
``forward_head(x, pre_logits=False)``; ``forward(x)``; ``forward_intermediates(x, indices, ...)``;
``reset_classifier(num_classes)``; ``num_features``; ``feature_info``; ``set_grad_checkpointing``;
``no_weight_decay()``; and the data config in ``pretrained_cfg``.
"""

from __future__ import annotations

import math
import numbers
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


class ModelArgError(ValueError):
    """An architecture argument the model cannot take, raised at build time.

    Constructors name their class; :func:`vitkit.create_model` re-raises it under the registered model's name
    (a model built inside another registered model keeps its own name after the outer one).
    """

    def __init__(self, model: str, detail: str, registered: bool = False):
        super().__init__(f"{model}: {detail}")
        self.model, self.detail, self.registered = model, detail, registered

    def named(self, name: str) -> ModelArgError:
        return ModelArgError(name, str(self) if self.registered else self.detail, registered=True)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_img_size(
    model: str, img_size, multiple: int | tuple[int, int] = 1, rule: str = "", minimum: int = 1
) -> tuple[int, int]:
    """``img_size`` (an int or ``(height, width)``) as ``(h, w)``, checked when the model is built.

    Args:
        model: the name errors start with.
        multiple: each side must be a positive multiple of this (per side with a tuple); ``rule`` names its origin.
        minimum: each side must be at least this many pixels.
    """
    if _is_int(img_size):
        h = w = int(img_size)
    elif isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(_is_int(v) for v in img_size):
        h, w = (int(v) for v in img_size)
    else:
        raise ModelArgError(model, f"img_size must be an int or (height, width), got {img_size!r}")
    mh, mw = (multiple, multiple) if isinstance(multiple, int) else multiple
    if h < minimum or w < minimum:
        raise ModelArgError(model, f"img_size={img_size!r}: each side must be at least {minimum} pixels, got {h}x{w}")
    if h % mh or w % mw or h < mh or w < mw:
        m = str(mh) if mh == mw else f"{mh}x{mw}"
        raise ModelArgError(model, f"img_size={img_size!r}: each side must be a multiple of {rule} = {m}, got {h}x{w}")
    return h, w


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
    img_size: tuple[int, int]  # the default input size (the data config's); families check it when built

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
        if x.dtype != torch.float32:  # the common case costs one comparison
            self._check_dtype(x)
        if x.ndim != 4:
            raise ValueError(f"{self.name}: expected a 4-D NCHW image batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"{self.name}: expected {self.in_chans} input channels (in_chans={self.in_chans}), "
                f"got {x.shape[1]} in input of shape {tuple(x.shape)}"
            )
        h, w = x.shape[2], x.shape[3]  # (not int(): that would fix an exported program to one input size)
        if fixed is not None and (h, w) != tuple(fixed):
            raise ValueError(
                f"{self.name}: expected input size {fixed[0]}x{fixed[1]} (img_size), got {h}x{w}; "
                + self._other_size_hint(h, w, multiple)
            )
        if h % multiple[0] or w % multiple[1]:
            raise ValueError(
                f"{self.name}: input height and width must be multiples of {multiple[0]}x{multiple[1]}, got {h}x{w}"
            )

    def _check_dtype(self, x: torch.Tensor) -> None:
        """A non-fp32 input: a float of the weights' dtype (or any float under autocast); integers never (raw
        pixels)."""
        if x.is_floating_point():
            weights = next(self.parameters(), None)
            if weights is None or weights.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
                return
            raise ValueError(
                f"{self.name}: input dtype {x.dtype} does not match the model's {weights.dtype} weights; "
                f"pass x.to({weights.dtype}) (or convert the model with .to(dtype))"
            )
        cfg = getattr(self, "pretrained_cfg", None) or {}
        norm = f" (mean={tuple(cfg['mean'])}, std={tuple(cfg['std'])})" if "mean" in cfg and "std" in cfg else ""
        raise ValueError(
            f"{self.name}: expected a floating-point image batch, got dtype {x.dtype}; raw pixels need "
            f"x.float() / 255, then normalising with the model's data config{norm}: (x - mean) / std per channel, "
            "or preprocess images with vitkit.data.transforms.EvalTransform.from_data_config(model.data_config)"
        )

    def _other_size_hint(self, h: int, w: int, multiple: tuple[int, int]) -> str:
        """What makes an ``h x w`` input work: a model built for it, or (ViT) ``dynamic_img_size=True``."""
        m = getattr(self, "input_multiple", 1)  # the build-time rule of families sized by img_size
        mh, mw = math.lcm(multiple[0], m), math.lcm(multiple[1], m)
        if h % mh == 0 and w % mw == 0:
            hint = f"create the model with img_size=({h}, {w}) (weights made at another size are resampled)"
        else:
            fit = (max(mh, h // mh * mh), max(mw, w // mw * mw))  # the nearest size below: a resize, no crop
            hint = (
                f"resize the input, or create the model with an img_size whose sides are multiples of {mh}x{mw} "
                f"(e.g. img_size={fit}) and resize to it"
            )
        if hasattr(self, "dynamic_img_size"):  # families that resample their position embedding per input
            hint += f", or with dynamic_img_size=True (any multiple of {multiple[0]}x{multiple[1]})"
        return hint

    def run_blocks(self, blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run a sequence of blocks, with activation checkpointing when enabled and training."""
        return run_blocks(blocks, x, self.grad_checkpointing and self.training)

    # ---- feature stages: forward_intermediates / prune_intermediate_layers -------------------------------------
    # The loop, the index handling and the pruning are shared; a family names its stage container and fills in
    # the steps that differ (its stem, how a stage runs, how a stage output becomes a map, what follows the
    # last stage, what pruning resets).

    feature_stages: str = "stages"  # the attribute holding the stages that feature_info lists, in order
    intermediate_formats: tuple[str, ...] = ("NCHW",)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Outputs of the stages listed in ``feature_info``, as NCHW maps (reductions as in ``feature_info``).

        Args:
            indices: an int n (the last n stages) or a list of stage indices (negatives allowed); None: all.
            norm: apply the model's final norm to the outputs (families with one; see ``_stage_output``).
            stop_early: run no stage after the last requested one.
            output_fmt: 'NCHW', or another of the family's ``intermediate_formats`` (ViT: 'NLC' tokens).
            intermediates_only: return only the list.

        Returns:
            ``(final_features, intermediates)``, or only the list with ``intermediates_only``.
        """
        if output_fmt not in self.intermediate_formats:
            raise ValueError(f"{self.name}: output_fmt must be one of {self.intermediate_formats}, got {output_fmt!r}")
        n = len(getattr(self, self.feature_stages))
        take, last = feature_take_indices(n, indices)
        last = last if (stop_early or intermediates_only) else n - 1
        x, ctx = self._stages_input(x)
        out = []
        for i in range(last + 1):
            x = self._stage_forward(i, x, ctx)
            if i in take:
                out.append(self._stage_output(i, x, ctx, norm, output_fmt))
        if intermediates_only:
            return out
        return self._stages_final(x, ctx), out

    def prune_intermediate_layers(self, indices: int | list[int] | None = None) -> list[int]:
        """Drop the stages after the last requested one and what follows them (for ``features_only``).

        Returns the requested stage indices, absolute and sorted.
        """
        stages = getattr(self, self.feature_stages)
        take, last = feature_take_indices(len(stages), indices)
        setattr(self, self.feature_stages, stages[: last + 1])
        self._prune_tail()
        return take

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """Check the image and compute the first stage's input."""
        raise NotImplementedError(f"{self.name}: forward_intermediates needs the family's _stem")

    def _stages_input(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Image -> the first stage's input, and a per-call context the other steps receive (default: none)."""
        return self._stem(x), None

    def _stage_forward(self, i: int, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Run stage ``i`` (default: its blocks in sequence, checkpointed when enabled)."""
        return self.run_blocks(getattr(self, self.feature_stages)[i], x)

    def _stage_output(self, i: int, x: torch.Tensor, ctx: Any, norm: bool, output_fmt: str) -> torch.Tensor:
        """Stage ``i``'s output as ``forward_intermediates`` returns it (default: the NCHW map as it is)."""
        return x

    def _stages_final(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        """What ``forward_features`` applies after the last stage."""
        raise NotImplementedError(f"{self.name}: forward_intermediates needs the family's _stages_final")

    def _prune_tail(self) -> None:
        """Reset what follows the stages once they are pruned (default: the classifier)."""
        self.reset_classifier(0)


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

    def _stages_final(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.final_conv(x)

    def _prune_tail(self) -> None:
        self.final_conv = nn.Identity()
        self.reset_classifier(0)
