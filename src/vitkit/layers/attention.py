"""Multi-head self-attention with a fused path and a capturable eager path.

The fused path calls ``F.scaled_dot_product_attention``. The eager path computes
``softmax(q k^T / sqrt(d)) v`` explicitly and passes the probabilities through the
``attn_probs`` identity module, so analysis tools can hook it by name. Which path runs is
decided per module (``module.fused_attn = True/False``) or, when that is ``None``, by the
process-wide switch :func:`use_fused_attn`. Analysis code switches explicitly, inside a
context manager, and the previous setting is always restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # the interpret side of attention_geometry (type only: layers never import interpret)
    from vitkit.interpret.geometry import ImageQuery

_FUSED_ATTN = True


def fused_attn() -> bool:
    """Whether attention modules with ``fused_attn=None`` take the fused SDPA path."""
    return _FUSED_ATTN


@contextlib.contextmanager
def use_fused_attn(enabled: bool) -> Iterator[None]:
    """Temporarily select the fused (True) or eager (False) attention path process-wide."""
    global _FUSED_ATTN
    prev = _FUSED_ATTN
    _FUSED_ATTN = bool(enabled)
    try:
        yield
    finally:
        _FUSED_ATTN = prev


class Attention(nn.Module):
    """Multi-head self-attention over tokens ``[B, N, C]`` (timm's ``Attention`` parameter layout)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn: bool | None = None
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.attn_probs = nn.Identity()  # hook point: eager-path attention probabilities [B, H, N, N]
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def use_fused(self) -> bool:
        return _FUSED_ATTN if self.fused_attn is None else self.fused_attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        x = attend(q, k, v, self.scale, self.attn_drop, self.attn_probs, self.use_fused())
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class MultiQueryAttention(nn.Module):
    """Multi-query attention (Shazeer 2019): per-head queries, one shared key/value head.

    Used by the official NesT CIFAR models ("local_multi_query"). Parameters: ``q`` (dim -> dim),
    ``kv`` (dim -> 2 * head_dim), ``proj``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"MultiQueryAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn: bool | None = None
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * self.head_dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.attn_probs = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    use_fused = Attention.use_fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, d)
        k, v = self.kv(x).reshape(B, 1, N, 2, self.head_dim).unbind(3)  # each (B, 1, N, d), shared by heads
        k, v = k.expand(-1, self.num_heads, -1, -1), v.expand(-1, self.num_heads, -1, -1)
        x = attend(q, k, v, self.scale, self.attn_drop, self.attn_probs, self.use_fused())
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    attn_drop: nn.Dropout,
    attn_probs: nn.Module,
    fused: bool,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale [+ bias]) v`` on ``(B, heads, N, d)`` tensors, fused or eager; ``bias`` is an
    additive ``(B, heads, N, M)`` logit term (relative positions), the fused path's ``attn_mask``."""
    if fused:
        p = attn_drop.p if attn_drop.training else 0.0
        mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn_probs(attn.softmax(dim=-1))
    return attn_drop(attn) @ v


def token_attention_cells(
    probs: torch.Tensor,
    query: ImageQuery,
    grid: tuple[int, int] | None = None,
    key_grid: tuple[int, int] | None = None,
    prefix: int = 0,
) -> torch.Tensor:
    """Token attention ``(B, heads, prefix + N, prefix + M)`` as an ``attention_geometry``: the row of the query's
    token over the key tokens, ``(B, heads, kh, kw)``. Prefix (class) tokens are dropped.

    Args:
        grid: the query token grid; default laid out from N with the image's aspect ratio.
        key_grid: the key token grid; default ``grid`` when M == N, else laid out from M with ``grid``'s aspect.
    """
    grid = grid or query.grid(probs.shape[-2] - prefix)
    n_keys = probs.shape[-1] - prefix
    if key_grid is None:
        key_grid = grid if n_keys == grid[0] * grid[1] else query.grid(n_keys, grid[0] / grid[1])
    qy, qx = query.cell(grid)
    row = probs[:, :, prefix + qy * grid[1] + qx, prefix:]  # (B, heads, M)
    return row.reshape(*row.shape[:2], *key_grid)
