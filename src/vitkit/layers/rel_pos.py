"""1-D relative position attention for ViT (the ViT paper's appendix D.4 "relative positional embeddings").

The paper: for every (query, key) pair of patches there is an offset ``p_q - p_k``, each offset has an embedding,
and an extra attention is run with the original query against those embeddings as keys; its logits are added as a
bias to the content logits before the softmax. Here, per head ``h``::

    logits[h, i, j] = (q_i * scale) . k_j  +  (q_i * scale) . r_h[offset(i, j)]

so the relative term is query-dependent (the paper's "extra attention" with relative embeddings as keys), not a
content-free scalar bias per offset. ARCHITECTURES.md does not cover appendix D.4: this description is the paper's
as the issue quotes it and as we read it, [unverified] against the paper's text here.

What the paper leaves open, and vitkit chooses (ours):

* **1-D over the flattened (row-major) patch sequence**, as the paper words it ("1-dimensional Relative
  Attention"): offset ``j - i`` in raster order, ``2 N - 1`` entries for ``N`` patches (a 2-D variant would index
  (row, column) offsets instead; not built here);
* one embedding table **per head** (``r_h`` has the head's width) and **per block** (no sharing across layers);
* the relative logits use the content logits' ``1/sqrt(head_dim)`` scale;
* **class token**: it has no place on the grid, so its pairs get three learned entries of their own, one for
  class-token query -> any patch key, one for patch query -> class-token key, one for class token -> itself
  (placed after the ``2 N - 1`` offset entries);
* **other grid sizes** (``dynamic_img_size`` or a checkpoint for another resolution): offsets beyond the table's
  range ``+-(N - 1)`` use the table's end entries (clipped). The table depends on the grid only through that
  range; note that a raster offset means another 2-D displacement when the grid's width changes.

The fused path passes the relative logits to ``F.scaled_dot_product_attention`` as an additive float mask; the
eager path adds them before an explicit softmax whose output passes the ``attn_probs`` hook. Both give the same
result (``tests/test_pos_embed.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from vitkit.layers.attention import Attention, attend


def relative_index_1d(num_patches: int, max_patches: int, num_prefix_tokens: int, device=None) -> torch.Tensor:
    """Table rows ``(prefix + N, prefix + N)`` for a sequence of ``num_patches`` grid tokens after the prefix.

    Patch pairs: ``(j - i)`` clipped to ``+-(max_patches - 1)``, shifted to ``0 .. 2 max_patches - 2``. Prefix (class)
    token pairs: the three rows after those (see the module docstring).
    """
    r = max_patches - 1
    pos = torch.arange(num_patches, device=device)
    rel = (pos[None, :] - pos[:, None]).clamp(-r, r) + r  # (N, N): query i (rows) -> key j (columns)
    if num_prefix_tokens == 0:
        return rel
    t = num_prefix_tokens + num_patches
    idx = torch.empty(t, t, dtype=torch.long, device=device)
    idx[num_prefix_tokens:, num_prefix_tokens:] = rel
    idx[:num_prefix_tokens, num_prefix_tokens:] = 2 * r + 1  # class-token query -> patch key
    idx[num_prefix_tokens:, :num_prefix_tokens] = 2 * r + 2  # patch query -> class-token key
    idx[:num_prefix_tokens, :num_prefix_tokens] = 2 * r + 3  # class token -> class token
    return idx


def relative_table_rows(max_patches: int, num_prefix_tokens: int) -> int:
    return 2 * max_patches - 1 + (3 if num_prefix_tokens else 0)


def resize_relative_table(table: torch.Tensor, max_patches: int, num_prefix_tokens: int) -> torch.Tensor:
    """A table ``(heads, rows, d)`` made for another grid, for one of ``max_patches`` patches: the offset part
    cropped around offset 0 or extended with its end entries (what clipping does at run time), the class-token
    rows kept. A model built at the new size then computes what the old one computes on that size."""
    extra = 3 if num_prefix_tokens else 0
    offsets, prefix_rows = table[:, : table.shape[1] - extra], table[:, table.shape[1] - extra :]
    old_r, new_r = (offsets.shape[1] - 1) // 2, max_patches - 1
    idx = (torch.arange(-new_r, new_r + 1).clamp(-old_r, old_r) + old_r).to(table.device)
    return torch.cat([offsets[:, idx], prefix_rows], dim=1)


class RelPosAttention(Attention):
    """:class:`~vitkit.layers.Attention` with 1-D relative position logits (module docstring); parameters
    ``qkv``, ``proj`` as ViT's, plus ``rel_table`` ``(heads, 2 N - 1 [+ 3], head_dim)``."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        max_patches: int = 196,
        num_prefix_tokens: int = 1,
    ):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.max_patches = max_patches
        self.num_prefix_tokens = num_prefix_tokens
        rows = relative_table_rows(max_patches, num_prefix_tokens)
        self.rel_table = nn.Parameter(torch.zeros(num_heads, rows, self.head_dim))
        nn.init.trunc_normal_(self.rel_table, std=0.02)

    def relative_logits(self, q: torch.Tensor) -> torch.Tensor:
        """``(q * scale) . r[offset(i, j)]`` as ``(B, heads, T, T)`` from queries ``(B, heads, T, d)``."""
        B, H, T, _ = q.shape
        qr = (q * self.scale) @ self.rel_table.transpose(-2, -1).to(q.dtype)  # (B, heads, T, rows)
        idx = relative_index_1d(T - self.num_prefix_tokens, self.max_patches, self.num_prefix_tokens, q.device)
        return torch.gather(qr, -1, idx.expand(B, H, T, T))  # row i picks its offsets' logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        bias = self.relative_logits(q)
        x = attend(q, k, v, self.scale, self.attn_drop, self.attn_probs, self.use_fused(), bias=bias)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))
