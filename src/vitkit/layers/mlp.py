"""Transformer feed-forward block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.helpers import apply_act, hooked, onednn_inference_ok


def _onednn_linear_ok(x: torch.Tensor, weight: torch.Tensor, observed: tuple[nn.Module, ...]) -> bool:
    return onednn_inference_ok(x, weight, observed, "_linear_pointwise")


def _linear_pointwise(x, weight, bias, attr: str, algorithm: str) -> torch.Tensor | None:
    try:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, attr, [], algorithm)
    except RuntimeError:  # a oneDNN build without this op or fusion: the caller's plain path
        return None
    return y.reshape(*x.shape[:-1], y.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; at CPU inference one oneDNN matmul with the bias added in its epilogue.

    PyTorch's CPU ``addmm`` first copies the bias into every output row and then accumulates the product onto
    it: two extra passes over the output. NesT-T at batch 16 on the 2-core Xeon (qkv, proj, fc2 of every layer,
    A/B in one process): fp32 17.8 -> 19.2 img/s, bf16 52.2 -> 54.8. Same conditions as :func:`linear_gelu`;
    callers with a module call it through :func:`apply_linear`, which keeps hooked modules on the plain call.
    """
    if bias is not None and _onednn_linear_ok(x, weight, ()):
        y = _linear_pointwise(x, weight, bias, "none", "")
        if y is not None:
            return y
    return F.linear(x, weight, bias)


def apply_linear(fc: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``fc(x)`` through :func:`linear` (a hooked ``fc`` is called as a module, so its hooks run)."""
    return fc(x) if hooked(fc) else linear(x, fc.weight, fc.bias)


def linear_gelu(fc: nn.Linear, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(fc(x))``; at CPU inference with a GELU, one oneDNN matmul with the bias and GELU in its epilogue.

    PyTorch's standalone GELU evaluates erf per element after the matmul wrote its output; oneDNN applies it
    while the tile is in registers. NesT-T's first-level MLP (50,176 tokens, 96 -> 384) on the 2-core Xeon:
    fp32 64.8 -> 37.3 ms (outputs bitwise equal), bf16 32.5 -> 19.8 ms (max difference one bf16 step).
    Training, autocast, tracing/export and hooked modules take the plain path.
    """
    if type(act) is nn.GELU and _onednn_linear_ok(x, fc.weight, (fc, act)):
        y = _linear_pointwise(x, fc.weight, fc.bias, "gelu", "tanh" if act.approximate == "tanh" else "none")
        if y is not None:
            return y
    return apply_act(act, fc(x))


class Mlp(nn.Module):
    """Linear -> activation -> dropout -> Linear -> dropout (the ViT/timm ``Mlp`` layout)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(apply_linear(self.fc2, self.drop1(linear_gelu(self.fc1, self.act, x))))
