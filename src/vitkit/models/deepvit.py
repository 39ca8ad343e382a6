"""DeepViT: "DeepViT: Towards Deeper Vision Transformer" (Zhou, Kang, Jin, Yang, Lian, Jiang, Hou, Feng; 2021,
arXiv 2103.11886). Reference implementation: zhoudaquan/dvit_repo ``models/deep_vision_transformer.py`` (read for
the layout and the variant arguments; no code taken from it).

A ViT whose last ``num_reattn`` blocks use re-attention (:mod:`vitkit.layers.re_attention`): the softmax maps of
the heads are mixed by a learned H x H matrix Theta and normalised, ``Norm(Theta^T Softmax(Q K^T / sqrt(d))) V``,
to keep attention maps from becoming alike across depth ("attention collapse"). The variants follow the official
code's ``deepvit_S`` / ``deepvit_L``:

==========  =====  =====  =====  =========  ====================  ===================================
variant     depth  width  heads  mlp ratio  re-attention blocks   other
==========  =====  =====  =====  =========  ====================  ===================================
deepvit_s   16     396    12     3          last 5 (11 plain)     maps x head_dim^-0.5 after the norm
deepvit_l   32     420    12     3          last 12 (20 plain)
==========  =====  =====  =====  =========  ====================  ===================================

``deepvit_tiny`` (ours, not the paper's: ViT-Ti's width, depth and single-conv patch embedding with 6 heads,
re-attention in the last 4 of 12 blocks, 5.5M parameters) is the family's small model for tests and quick runs.

Both use the official code's 3-conv patch embedding (T2T-style: 7x7/2 conv + BN + ReLU, 3x3 conv + BN + ReLU,
then a (p/2)x(p/2) projection), BatchNorm as the re-attention norm, and ``scale_adjustment = 0.5``: every residual
branch's output is multiplied by ``1 / scale_adjustment`` (2). The official code also multiplies a block's input
by 0.5 before its LayerNorms; a LayerNorm is invariant to that up to its epsilon, so vitkit leaves it out.

Less attention on re-attention (LaViT, arXiv 2406.00427; ``num_less > 0``, registered as ``deepvit_s_lavit``): the
last ``num_less`` blocks compute no ``Q K^T``; each transforms the previous block's scores (LaViT's Theta/Psi maps,
identity at init) and re-attends the softmax of the result
(:class:`~vitkit.layers.re_attention.LessReAttention`). Their N x N maps fix the token count, so such a model
takes one input size (``img_size``).

Paper numbers (DeepViT's comparison table, as quoted in a survey; the paper itself was not available to us):
DeepViT-S 27M params, 6.2 GMACs, 82.3% top-1; DeepViT-L 55M, 12.5 GMACs, 83.1%. vitkit's counts at 224 px:
deepvit_s 27.31M and 6.36 GMACs (the table's 27M within its two digits); deepvit_l, with the official code's
arguments (width 420, 32 blocks), 58.88M and 13.15 GMACs, 7% above the table. Width 408 would give 55.64M and
12.48 GMACs, close to the table; which width the paper's DeepViT-L has could not be checked, so vitkit keeps the
code's 420 (``create_model("deepvit_l", embed_dim=408)`` builds the other). timm has no DeepViT; no pretrained
weights are registered.

Attention paths: plain blocks keep ViT's fused/eager attention; re-attention and less-attention blocks are eager
only (the mix needs the probabilities). Every block's map (after the mix and norm) is captured by
:func:`vitkit.interpret.capture_attention`.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from vitkit.layers import Block, ConvNormAct, PatchEmbed, drop_path_schedule, to_2tuple
from vitkit.layers.block import LayerNormEps6
from vitkit.layers.re_attention import LessReAttention, ReAttention
from vitkit.models._base import FeatureInfo, ModelArgError
from vitkit.models._registry import INCEPTION_MEAN, INCEPTION_STD, default_cfg, register_variant
from vitkit.models.vit import VisionTransformer


class ConvStemEmbed(nn.Module):
    """Patch embedding through a small CNN (the official DeepViT code's, after T2T-ViT): 7x7/2 conv-BN-ReLU,
    3x3 conv-BN-ReLU (64 channels), then a conv with kernel = stride = patch / 2 to ``embed_dim``: tokens
    ``[B, N, C]`` with one token per ``patch_size`` pixels."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, width: int = 64):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        if self.patch_size[0] % 2 or self.patch_size[1] % 2:
            raise ModelArgError("ConvStemEmbed", f"patch_size must be even (the stem halves it), got {patch_size!r}")
        self.reduction = self.patch_size
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.stem = nn.Sequential(ConvNormAct(in_chans, width, 7, stride=2), ConvNormAct(width, width, 3))
        half = (self.patch_size[0] // 2, self.patch_size[1] // 2)
        self.proj = nn.Conv2d(width, embed_dim, kernel_size=half, stride=half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)  # (B, N, C)


class DeepViTBlock(Block):
    """ViT's pre-norm block around a layer that returns ``(output, scores)``; both residual branches are scaled
    by ``branch_scale``. ``forward(x, carried) -> (x, scores)`` passes scores on to a less-attention block."""

    def __init__(self, *args, branch_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.branch_scale = branch_scale

    def forward(self, x: torch.Tensor, carried: torch.Tensor | None = None):
        y, carried = self.attn(self.norm1(x), carried)
        x = x + self.drop_path1(y) * self.branch_scale
        return x + self.drop_path2(self.mlp(self.norm2(x))) * self.branch_scale, carried


class DeepViT(VisionTransformer):
    """ViT with re-attention in its last ``num_reattn`` blocks (and, optionally, less attention in the last
    ``num_less``). Everything else (embedding, class token, pooling, head, intermediates) is ViT's."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 396,
        depth: int = 16,
        num_heads: int = 12,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        num_reattn: int = 5,
        reattn_norm: str = "bn",
        reattn_scale: bool = False,
        scale_adjustment: float = 0.5,
        conv_stem: bool = True,
        num_less: int = 0,
        class_token: bool = True,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        """
        Args:
            num_reattn: how many of the last blocks use re-attention (0: a plain ViT; ``depth``: every block).
            reattn_norm: the re-attention norm, 'bn' (the paper's code), 'ln' (over heads) or 'none'.
            reattn_scale: multiply re-attended maps by ``head_dim ** -0.5`` (the official DeepViT-S does).
            scale_adjustment: residual branches are multiplied by its inverse (official: 0.5, so by 2).
            conv_stem: the 3-conv patch embedding (:class:`ConvStemEmbed`) instead of ViT's single conv.
            num_less: how many of the last blocks are less-attention blocks (transform the previous block's
                scores instead of computing ``Q K^T``); fixes the input size to ``img_size``.
            Others: as :class:`~vitkit.models.vit.VisionTransformer`.
        """
        name = "DeepViT"
        if not 0 <= num_reattn <= depth:
            raise ModelArgError(name, f"num_reattn must be between 0 and depth ({depth}), got {num_reattn}")
        if not 0 <= num_less < depth:
            raise ModelArgError(name, f"num_less must be between 0 and depth - 1 ({depth - 1}), got {num_less}")
        if num_less and dynamic_img_size:
            raise ModelArgError(name, "num_less > 0 fixes the token count (N x N maps): dynamic_img_size=False")
        if scale_adjustment <= 0:
            raise ModelArgError(name, f"scale_adjustment must be > 0, got {scale_adjustment}")
        embed = ConvStemEmbed if conv_stem else PatchEmbed
        # ViT's embedding, tokens, norms and head; the blocks are DeepViT's (built below)
        super().__init__(
            img_size,
            patch_size,
            in_chans,
            num_classes,
            global_pool,
            embed_dim,
            0,
            num_heads,
            mlp_ratio,
            qkv_bias,
            class_token,
            dynamic_img_size,
            drop_rate,
            attn_drop_rate,
            drop_path_rate,
            embed,
        )
        self.num_reattn, self.num_less = num_reattn, num_less
        tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        mix = dict(norm=reattn_norm, mix_scale=(embed_dim // num_heads) ** -0.5 if reattn_scale else 1.0)
        first_re, first_less = depth - num_reattn, depth - num_less
        dpr = drop_path_schedule(drop_path_rate, depth)
        blocks = []
        for i in range(depth):
            if i >= first_less:
                layer = partial(LessReAttention, num_tokens=tokens, mix=i >= first_re, **mix)
            else:
                layer = partial(ReAttention, mix=i >= first_re, keep_scores=i + 1 == first_less, **mix)
            blocks.append(
                DeepViTBlock(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    dpr[i],
                    norm_layer=LayerNormEps6,
                    attn_layer=layer,
                    branch_scale=1 / scale_adjustment,
                )
            )
        self.blocks = nn.Sequential(*blocks)
        r = self.patch_embed.reduction
        self.feature_info = FeatureInfo(
            dict(num_chs=embed_dim, reduction=r[0], module=f"blocks.{i}") for i in range(depth)
        )
        self.default_out_indices = min(3, depth)
        self._init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, ctx = self._stages_input(x)
        for i in range(len(self.blocks)):
            x = self._stage_forward(i, x, ctx)
        return self.norm(x)  # (B, prefix + N, C)

    # forward_intermediates: ViT's, with the scores carried from block to block in the context
    def _stages_input(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x, grid = self._embed(x)
        return x, dict(grid=grid, carried=None)

    def _stage_forward(self, i: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        blk = self.blocks[i]
        if self.grad_checkpointing and self.training:
            x, ctx["carried"] = torch.utils.checkpoint.checkpoint(blk, x, ctx["carried"], use_reentrant=False)
        else:
            x, ctx["carried"] = blk(x, ctx["carried"])
        return x

    def _stage_output(self, i: int, x: torch.Tensor, ctx: dict, norm: bool, output_fmt: str) -> torch.Tensor:
        return super()._stage_output(i, x, ctx["grid"], norm, output_fmt)


# ---- variants [official code's deepvit_S / deepvit_L; see the module docstring] -------------------------------
_VARIANTS = {
    # ours, for tests and small runs: ViT-Ti's width, depth and patch embedding, 6 heads, re-attention in the last third
    "deepvit_tiny": dict(embed_dim=192, depth=12, num_heads=6, num_reattn=4, conv_stem=False),
    "deepvit_s": dict(embed_dim=396, depth=16, num_heads=12, num_reattn=5, reattn_scale=True),
    "deepvit_l": dict(embed_dim=420, depth=32, num_heads=12, num_reattn=12),
    # ours: DeepViT-S whose re-attention blocks after the first are less-attention blocks (LaViT on re-attention)
    "deepvit_s_lavit": dict(embed_dim=396, depth=16, num_heads=12, num_reattn=5, reattn_scale=True, num_less=4),
}


def _register(name: str, args: dict) -> None:
    cfg = default_cfg(
        mean=INCEPTION_MEAN,  # the official code's (0.5, 0.5, 0.5)
        std=INCEPTION_STD,
        crop_pct=0.9,
        first_conv="patch_embed.stem.0.conv",
        test_input_size=(3, 64, 64),
    )
    register_variant(name, DeepViT, dict(args, img_size=224, patch_size=16), family="deepvit", cfg=cfg)


for _name, _args in _VARIANTS.items():
    _register(_name, _args)
