"""PVT v1: "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without Convolutions"
(Wang et al., ICCV 2021, arXiv 2102.12122). timm has only PVT v2 (``pvt_v2_*``); v1 follows the paper
(ARCHITECTURES.md §6): four stages at strides 4/8/16/32, each a patch embedding (conv with kernel = stride + LayerNorm)
and a learned position embedding, then pre-norm blocks with spatial-reduction attention (SRA):
keys and values come from the token grid reduced ``R_i`` times per side (``SR(x) = LN(Reshape(x, R_i) W^S)``, a
conv with kernel = stride = R_i, then LayerNorm), R = 8/4/2/1, widths 64/128/320/512, heads 1/2/5/8, MLP ratios
8/8/4/4, depths T (2,2,2,2), S (3,4,6,3), M (3,4,18,3), L (3,8,27,3).

LaViT is built on this same hierarchy, so a PVT v1 here is vitkit's :class:`~vitkit.models.lavit.LaViT` with
vanilla (SRA) attention in every block and nothing carried between stages; the blocks, stages and SRA layer are
written once (:mod:`vitkit.layers.less_attention`'s ``VanillaAttention``).

Layout choices that are ours, not the paper's:

* no class token: the paper adds one in stage 4 and classifies from it; here the stage-4 map is average-pooled
  (as PVT v2 does), so every stage is a plain token grid and less attention's N x N maps apply unchanged;
* each stage ends with a LayerNorm (the paper normalises only the stage-4 output), so every pyramid level is
  normalised for dense heads;
* parameter names are vitkit's LaViT names (``stages.i.blocks.j.attn.{q,kv,sr,norm,proj}``), not the official
  repository's ``block{i}`` / ``patch_embed{i}``. With 1000 classes the counts are within 0.3% of the paper's
  13.2 / 24.5 / 44.2 / 61.4 M (tests/test_pvt_swin.py).

Less attention composed with PVT (``less_attention=True``, LaViT's "works with other attentions"): the later blocks of
stages 3 and 4 (where a stage's N x N / N x M maps are small enough for the O(N^3) transform) become LaViT
less-attention blocks on SRA's reduced keys, and each stage's last scores are carried into the next (LaViT's
residual attention downsampling). ``num_va`` overrides where the vanilla blocks end. ``pvt_tiny`` with
less attention is exactly ``lavit_tiny``'s architecture.
"""

from __future__ import annotations

from vitkit.models._registry import default_cfg, register_variant
from vitkit.models.lavit import LaViT


class PyramidVisionTransformer(LaViT):
    """PVT v1 (spatial-reduction attention in every block), or with ``less_attention`` LaViT on it."""

    def __init__(
        self,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        less_attention: bool = False,
        num_va: tuple[int, ...] | None = None,
        inherit: bool | None = None,
        **kwargs,
    ):
        """
        Args:
            depths: blocks per stage.
            less_attention: make the later blocks of the last two stages less-attention blocks (one vanilla block
                each, as in ``lavit_*``) and carry attention across stages.
            num_va: vanilla-attention blocks at the start of each stage (default: all, or as ``less_attention`` says).
            inherit: carry each stage's last scores into the next (default: ``less_attention``).
            **kwargs: the rest of :class:`~vitkit.models.lavit.LaViT`'s arguments (img_size, widths, sr_ratios, ...).
        """
        n = len(depths)
        if num_va is None:
            num_va = tuple(d if (i < n - 2 or not less_attention) else 1 for i, d in enumerate(depths))
        inherit = less_attention if inherit is None else inherit
        super().__init__(depths=depths, num_va=num_va, inherit=inherit, **kwargs)


_VARIANTS = {
    "pvt_tiny": dict(depths=(2, 2, 2, 2)),
    "pvt_small": dict(depths=(3, 4, 6, 3)),
    "pvt_medium": dict(depths=(3, 4, 18, 3)),
    "pvt_large": dict(depths=(3, 8, 27, 3)),
}

for _name, _args in _VARIANTS.items():
    register_variant(
        _name,
        PyramidVisionTransformer,
        dict(
            embed_dims=(64, 128, 320, 512),
            num_heads=(1, 2, 5, 8),
            mlp_ratios=(8, 8, 4, 4),
            sr_ratios=(8, 4, 2, 1),
            **_args,
        ),
        family="pvt",
        cfg=default_cfg(crop_pct=0.9, first_conv="stages.0.patch_embed", test_input_size=(3, 64, 64)),
    )
