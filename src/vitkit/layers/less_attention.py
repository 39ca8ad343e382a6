"""Less-Attention (LaViT, Zhang et al., CVPR 2024, arXiv 2406.00427): reuse attention scores, not recompute them.

* :class:`VanillaAttention` computes ``A = Q K^T / sqrt(d)`` (optionally over spatially reduced keys, PVT's SRA,
  so the mechanism composes with another attention type) and returns ``softmax(A) V`` together with ``A``.
  An inherited score matrix from the previous stage can be added to ``A`` (residual-based downsampling).
* :class:`LessAttention` does not compute ``Q K^T``: it transforms the previous layer's scores,
  ``A_l = Psi(Theta(A_{l-1})^T)^T`` with learned maps Theta (on the key axis, M x M) and Psi (on the query axis,
  N x N), then ``softmax(A_l) V_l`` with V still projected per layer.
* :class:`AttentionDownsample` turns the last scores of one stage into the starting scores of the next when the
  token grid shrinks 2x per side.
* :func:`dp_loss` is the Diagonality Preserving loss on the LA layers' attention.

Choices where the paper's text was not available to us (ARCHITECTURES.md §3 lists what is known), each a named
option; the defaults are ours, not the paper's:

=====================  ============================  =========================================================
option                 default                       source / reasoning
=====================  ============================  =========================================================
``carry``              'pre' (pre-softmax scores)     the LA equation re-applies softmax, so the carried matrix
                                                      is read as the score matrix ("QK^T-equivalent" in the
                                                      seed slides); 'post' carries probabilities instead
``residual``           False                          the review's transcription of the LA equation has none;
                                                      True gives ``A_l = T(A_{l-1}) + A_{l-1}``
``share_heads``        True                           unknown in the paper; sharing keeps Theta/Psi at N^2
                                                      parameters per layer (per-head: heads * N^2)
init of Theta, Psi     identity, zero bias            ours: an LA layer starts by reusing the previous
                                                      attention exactly, then learns to transform it
downsampling operator  2x2 average pool of the query  ours: the third-party note describes a 4x4/4 conv on the
                       grid, adaptive pool of the     matrix seen as an image, which groups 4 row-adjacent
                       key grid, learned head mixing  tokens rather than the 2x2 patches that merge; pooling
                                                      over the spatial grids keeps rows and columns aligned
                                                      with the merged tokens
DP loss                on softmax probabilities;      symmetry + diagonal-dominance from the seed slides; on
                       mean |P - P^T| +               probabilities the diagonal term is bounded (pre-softmax
                       mean((1 - P_ii) - (N-1) P_ii)  scores would let it fall without limit); 'mean' weighs
                       / (N - 1); 'mean' over layers  layers equally, 'sum' sums matrix entries and so weighs
                                                      large maps more, as the slides note of the paper's loss
=====================  ============================  =========================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.attention import token_attention_cells

if TYPE_CHECKING:  # the interpret side of attention_geometry (type only)
    from vitkit.interpret import AttentionRecord
    from vitkit.interpret.geometry import ImageQuery

_CARRY = ("pre", "post")


class VanillaAttention(nn.Module):
    """Multi-head attention that also returns its pre-softmax scores ``[B, heads, N, M]``.

    With ``sr_ratio > 1`` keys and values come from the token grid reduced by a strided conv + LayerNorm
    (PVT spatial-reduction attention), so ``M = N / sr_ratio^2``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        sr_ratio: int = 1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"VanillaAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.attn_probs = nn.Identity()  # hook point: (B, heads, N, M)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def reduce(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens for keys/values: ``x`` itself, or its grid reduced by ``sr_ratio``."""
        if self.sr_ratio == 1:
            return x
        B, N, C = x.shape
        x = self.sr(x.transpose(1, 2).reshape(B, C, *grid))  # (B, C, h/r, w/r)
        return self.norm(x.flatten(2).transpose(1, 2))

    def forward(self, x: torch.Tensor, grid: tuple[int, int], inherited: torch.Tensor | None = None):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        kv = self.kv(self.reduce(x, grid)).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (B, H, M, d)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, M)
        if inherited is not None:
            scores = scores + inherited
        probs = self.attn_probs(scores.softmax(dim=-1))
        out = (self.attn_drop(probs) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out)), scores, probs

    def attention_geometry(self, record: AttentionRecord, query: ImageQuery) -> torch.Tensor:
        """(B, heads, N, M): queries on the stage's token grid, keys on it reduced ``sr_ratio`` times per side."""
        g = record.grid
        return token_attention_cells(record.probs, query, g, (g[0] // self.sr_ratio, g[1] // self.sr_ratio))


class LessAttention(nn.Module):
    """``A_l = Psi(Theta(A_{l-1})^T)^T``; output ``softmax(A_l) V_l`` (V from the layer's own projection)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_queries: int,
        num_keys: int,
        qkv_bias: bool = True,
        sr_ratio: int = 1,
        share_heads: bool = True,
        residual: bool = False,
        carry: str = "pre",
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if carry not in _CARRY:
            raise ValueError(f"LessAttention: carry must be one of {_CARRY}, got {carry!r}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.sr_ratio, self.residual, self.carry = sr_ratio, residual, carry
        h = 1 if share_heads else num_heads
        # Theta mixes the key axis (M), Psi the query axis (N); identity init reuses the previous attention as is
        self.theta = nn.Parameter(torch.eye(num_keys).repeat(h, 1, 1))
        self.theta_bias = nn.Parameter(torch.zeros(h, 1, num_keys))
        self.psi = nn.Parameter(torch.eye(num_queries).repeat(h, 1, 1))
        self.psi_bias = nn.Parameter(torch.zeros(h, 1, num_queries))
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.attn_probs = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    reduce = VanillaAttention.reduce

    def transform(self, prev: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, M]`` -> ``[B, H, N, M]``: Theta on the key axis, then Psi on the query axis."""
        a = prev @ self.theta + self.theta_bias  # Theta(A) = A W_theta: mixes keys
        a = (a.transpose(-2, -1) @ self.psi + self.psi_bias).transpose(-2, -1)  # Psi on the transposed: queries
        return a + prev if self.residual else a

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int], prev: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output, the scores to carry on, and the attention probabilities.

        Args:
            mask: an additive term for the softmax only, broadcastable to ``[B, heads, N, M]`` (Swin's shifted-window
                mask); the carried scores stay unmasked, so a later layer can use them under its own mask.
        """
        B, N, C = x.shape
        if prev.shape[-2:] != (self.psi.shape[-1], self.theta.shape[-1]):
            raise ValueError(
                f"LessAttention: carried attention has shape {tuple(prev.shape[-2:])}, this layer maps "
                f"{self.psi.shape[-1]} queries x {self.theta.shape[-1]} keys (fixed by the model's img_size)"
            )
        scores = self.transform(prev)
        probs = self.attn_probs((scores if mask is None else scores + mask).softmax(dim=-1))
        v = self.v(self.reduce(x, grid)).reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        out = (probs @ v).transpose(1, 2).reshape(B, N, C)
        carried = scores if self.carry == "pre" else probs
        return self.proj_drop(self.proj(out)), carried, probs

    attention_geometry = VanillaAttention.attention_geometry


class AttentionDownsample(nn.Module):
    """Previous stage's last scores ``[B, H1, N1, M1]`` -> starting scores ``[B, H2, N2, M2]`` for the next stage.

    The query grid is average-pooled to the next stage's grid (2x2 when tokens merge 2x2), the key grid is
    adaptively pooled to the next key grid, and heads are mixed by a learned linear map (initialised to the
    identity for equal head counts, else to the mean of the previous heads).
    """

    def __init__(self, heads_in: int, heads_out: int):
        super().__init__()
        # identity when the head count is kept (isotropic models), else the mean of the previous heads
        init = torch.eye(heads_in) if heads_in == heads_out else torch.full((heads_out, heads_in), 1.0 / heads_in)
        self.mix = nn.Parameter(init)
        self.bias = nn.Parameter(torch.zeros(heads_out))

    def forward(
        self,
        a: torch.Tensor,
        q_grid: tuple[int, int],
        k_grid: tuple[int, int],
        new_q_grid: tuple[int, int],
        new_k_grid: tuple[int, int],
    ) -> torch.Tensor:
        B, H, N, M = a.shape
        # key axis: each query row is an image over the key grid
        a = a.reshape(B * H * N, 1, *k_grid)
        a = F.adaptive_avg_pool2d(a, new_k_grid).reshape(B, H, N, -1)  # (B, H, N, M2)
        M2 = a.shape[-1]
        # query axis: each key column is an image over the query grid
        a = a.transpose(2, 3).reshape(B * H * M2, 1, *q_grid)
        a = F.adaptive_avg_pool2d(a, new_q_grid).reshape(B, H, M2, -1).transpose(2, 3)  # (B, H, N2, M2)
        return torch.einsum("oh,bhnm->bonm", self.mix, a) + self.bias[:, None, None]


def dp_loss(probs: list[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Diagonality Preserving loss over LA layers' attention probabilities ``[B, H, N, N]``.

    Per layer: a symmetry term ``|P - P^T|`` (zero exactly for symmetric P) plus a diagonal term
    ``((1 - P_ii) - (N - 1) P_ii) / (N - 1)`` per row (falls as the diagonal dominates). 'mean' averages each
    term over its entries and sums layers; 'sum' sums entries, so layers with larger maps weigh more.
    Non-square maps (spatially reduced keys) have no diagonal and are skipped.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"dp_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    total = None
    for p in probs:
        n = p.shape[-1]
        if p.shape[-2] != n or n < 2:
            continue
        sym = (p - p.transpose(-2, -1)).abs()
        diag = p.diagonal(dim1=-2, dim2=-1)  # (B, H, N)
        off = p.sum(-1) - diag
        dom = (off - (n - 1) * diag) / (n - 1)
        term = sym.mean() + dom.mean() if reduction == "mean" else sym.sum() + dom.sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=probs[0].device if probs else None)
    return total
