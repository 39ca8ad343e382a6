"""Convolution + BatchNorm + activation and a pooled classifier head (timm names: ConvNormAct, ClassifierHead)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.helpers import apply_act, hooked, onednn_inference_ok


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round a channel count to a multiple of ``divisor``, never dropping more than 10% (MobileNet rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class ConvNormAct(nn.Module):
    """``conv`` (no bias, symmetric padding) -> ``bn`` -> ``act`` (identity when ``act_layer`` is None)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act_layer: type[nn.Module] | None = nn.ReLU,
        dilation: int = 1,
    ):
        super().__init__()
        pad = (kernel_size - 1) // 2 * dilation
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, pad, dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.bn, nn.Identity) and not hooked(self.bn):  # BatchNorm folded: maybe one fused conv
            y = conv_act(self.conv, self.act, x)
            if y is not None:
                return y
        return apply_act(self.act, self.bn(self.conv(x)))


# activations oneDNN can apply in a convolution's epilogue (attr names of torch.ops.mkldnn._convolution_pointwise)
_CONV_EPILOGUE = {nn.Identity: "none", nn.ReLU: "relu", nn.SiLU: "swish", nn.Hardswish: "hardswish"}


def conv_act(conv: nn.Conv2d, act: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``act(conv(x))`` as one oneDNN convolution with bias and activation in its epilogue, or None when that
    path does not apply (training, autocast, tracing, hooks, other activations or padding modes): the caller
    then runs the plain modules.

    Used at inference once BatchNorm is folded. Batch 16, channels_last, on the 2-core Xeon, A/B in one process,
    ms per forward: HaloNet-26T bf16 183-213 -> 159-166 (fp32 within noise), MobileViT-XXS fp32 117-120 -> 114,
    MobileViT-XS bf16 142-148 -> 133-142. ReLU gives the plain path's values exactly; SiLU/Hardswish are applied
    before the output is rounded (bf16 differs by up to one step).
    """
    attr = _CONV_EPILOGUE.get(type(act))
    if attr is None or not _onednn_conv_ok(conv, x, (conv, act)):
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, *_geometry(conv), attr, [], "")
    except RuntimeError:  # a oneDNN build without this op or fusion: the plain path
        return None


def _onednn_conv_ok(conv: nn.Conv2d, x: torch.Tensor, observed: tuple[nn.Module, ...]) -> bool:
    """:func:`onednn_inference_ok` for a 2-D convolution with explicit zero padding (what the fused op takes)."""
    return (
        x.dim() == 4
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and onednn_inference_ok(x, conv.weight, observed, "_convolution_pointwise")
    )


def _geometry(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    """``padding, stride, dilation, groups`` as ``torch.ops.mkldnn._convolution_pointwise`` takes them."""
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def conv_residual_act(
    cna: ConvNormAct, y: torch.Tensor, shortcut: torch.Tensor, drop_path: nn.Module, act: nn.Module | None
) -> torch.Tensor:
    """``act(drop_path(cna(y)) + shortcut)``, the end of a residual block whose last ``cna`` has no activation
    (``act=None``: no activation after the sum, as in MobileNetV2's inverted residual).

    At inference with ``cna``'s BatchNorm folded this is one oneDNN convolution with the bias, the residual add
    and the activation in its epilogue (``_convolution_pointwise.binary``): no separate pass over the block's
    output for the sum or the activation. Alone at HaloNet-26T's shapes (batch 16, channels_last, the 2-core
    Xeon): bf16 2.5 -> 1.3 ms (256 -> 1024 ch, 16x16), fp32 24.9 -> 17.3 ms (128 -> 512 ch, 32x32); fp32 values
    equal the plain path's exactly, bf16 adds before rounding. Otherwise the modules run one by one.
    """
    attr = "none" if act is None else _CONV_EPILOGUE.get(type(act))
    conv = cna.conv
    observed = (cna, conv, cna.bn, cna.act, drop_path) + (() if act is None else (act,))
    if (
        attr is not None
        and isinstance(cna.bn, nn.Identity)
        and isinstance(cna.act, nn.Identity)
        and (isinstance(drop_path, nn.Identity) or not drop_path.training)
        and shortcut.dtype == y.dtype
        and _onednn_conv_ok(conv, y, observed)
        and not (torch.is_grad_enabled() and shortcut.requires_grad)
    ):
        try:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                y, shortcut, conv.weight, conv.bias, *_geometry(conv), "add", None,
                None if attr == "none" else attr, [], None,
            )  # fmt: skip
        except RuntimeError:  # shapes or a oneDNN build the fused op does not take: the plain path
            pass
    out = drop_path(cna(y)) + shortcut
    return out if act is None else apply_act(act, out)


@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> int:
    """Fold every :class:`ConvNormAct`'s BatchNorm into its convolution, in place, for inference.

    ``conv(x) * g + c`` with ``g = gamma / sqrt(running_var + eps)`` and ``c = beta - running_mean * g`` is one
    convolution with weights scaled per output channel and a bias; ``bn`` becomes an identity. Outputs are the
    same up to rounding. The model must be in eval mode (training-mode BatchNorm normalises with batch
    statistics, which cannot be folded). Returns the number of folded pairs.
    """
    if model.training:
        raise ValueError("fuse_conv_bn: call model.eval() first (training-mode BatchNorm cannot be folded)")
    n = 0
    for m in model.modules():
        if isinstance(m, ConvNormAct) and isinstance(m.bn, nn.BatchNorm2d) and m.bn.track_running_stats:
            conv, bn = m.conv, m.bn
            g = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
            shift = (bn.bias if bn.affine else 0) - bn.running_mean * g
            fused = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
                bias=True,
                padding_mode=conv.padding_mode,
            ).to(device=conv.weight.device, dtype=conv.weight.dtype)
            fused.weight.copy_(conv.weight * g.reshape(-1, 1, 1, 1))
            fused.bias.copy_(shift + (conv.bias * g if conv.bias is not None else 0))
            m.conv, m.bn = fused, nn.Identity()
            n += 1
    return n


class ClassifierHead(nn.Module):
    """Global average pool -> dropout -> ``fc`` (identity when ``num_classes`` is 0)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.drop_rate = drop_rate
        self._in_features = in_features
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int) -> None:
        self.fc = nn.Linear(self._in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.dropout(x.mean(dim=(2, 3)), p=self.drop_rate, training=self.training)  # (B, C)
        return x if pre_logits else self.fc(x)
