"""Small argument helpers."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def to_2tuple(x: int | Iterable[int]) -> tuple[int, int]:
    """Return ``(x, x)`` for a scalar, or the pair itself for a 2-sequence."""
    if isinstance(x, Iterable) and not isinstance(x, str):
        t = tuple(x)
        if len(t) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(t[0]), int(t[1])
    return int(x), int(x)


def trunc_normal_linears_(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal weights (``std``) and zero biases for every ``nn.Linear`` in ``module``, in module order
    (the ViT/timm initialisation of transformer layers)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
