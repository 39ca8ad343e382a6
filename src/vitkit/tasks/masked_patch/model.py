"""Masked patch prediction around a ViT: the corruption of patch embeddings and the per-patch colour classifier.

ViT paper (Dosovitskiy et al., ICLR 2021, arXiv 2010.11929), appendix B.1.2: "we corrupt 50% of patch embeddings
by either replacing their embeddings with a learnable [mask] embedding (80%), a random other patch embedding (10%)
or just keeping them as is (10%) ... Finally we predict the 3-bit, mean color (i.e., 512 colors in total) of every
corrupted patch using their respective patch representations."

What the paper leaves open, and what vitkit chooses (ours):

* exactly ``round(fraction * N)`` (at least one) of an image's N patches are corrupted, not a coin per patch,
  chosen uniformly;
  each corrupted patch independently becomes [mask] / a random other patch / itself with 0.8 / 0.1 / 0.1;
* the "random other patch" is another patch of the same image (uniform over its other N - 1 patches), taken
  before corruption; the corruption acts on the patch embeddings, before the position embedding is added, so a
  replaced patch keeps its own position (as BERT replaces token embeddings, not position embeddings);
* the [mask] embedding starts at N(0, 0.02) like the position embedding;
* the prediction head is one linear layer on each patch token after the ViT's final LayerNorm (for mean-pooled
  ViTs, whose final norm acts on the pooled vector, a LayerNorm of its own first).

The wrapper's state dict is the ViT under ``backbone.`` and these parts under ``mpp.``; the ViT checkpoint filter
(:func:`vitkit.models.vit.masked_patch_backbone`) takes the backbone out of it for fine-tuning.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from vitkit.models.vit import MPP_BACKBONE, MPP_PARTS, VisionTransformer

# what happened to each patch: untouched (not a prediction target), or one of the three corruptions
UNTOUCHED, MASKED, RANDOM, KEPT = 0, 1, 2, 3
KINDS = {MASKED: "mask", RANDOM: "random", KEPT: "keep"}


def draw_corruption(
    batch: int,
    num_patches: int,
    rng: np.random.Generator,
    fraction: float = 0.5,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which patches of each image are corrupted and how: ``(mode, source)``, both ``(batch, num_patches)`` int64.

    ``mode`` is :data:`UNTOUCHED`, :data:`MASKED`, :data:`RANDOM` or :data:`KEPT`; ``source[b, i]`` is the patch whose
    embedding position ``i`` receives (another patch of the same image where ``mode`` is RANDOM, ``i`` elsewhere).
    """
    n = max(1, math.floor(fraction * num_patches + 0.5)) if fraction > 0 else 0
    if random_prob > 0 and n > 0 and num_patches < 2:
        raise ValueError(f"masked patch prediction: a random other patch needs at least 2 patches, got {num_patches}")
    chosen = np.argsort(rng.random((batch, num_patches)), axis=1)[:, :n]  # a uniform n-subset per image
    u = rng.random((batch, n))
    kind = np.where(u < mask_prob, MASKED, np.where(u < mask_prob + random_prob, RANDOM, KEPT))
    other = rng.integers(0, max(num_patches - 1, 1), size=(batch, n))
    other += other >= chosen  # uniform over the image's other patches: skip the patch itself
    mode = np.zeros((batch, num_patches), dtype=np.int64)
    source = np.tile(np.arange(num_patches, dtype=np.int64), (batch, 1))
    rows = np.arange(batch)[:, None]
    mode[rows, chosen] = kind
    source[rows, chosen] = np.where(kind == RANDOM, other, chosen)
    return torch.from_numpy(mode), torch.from_numpy(source)


def corrupt_embeddings(
    tokens: torch.Tensor, mode: torch.Tensor, source: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """Patch embeddings ``(B, N, C)`` with MASKED positions set to ``mask_token`` and RANDOM ones copied from
    ``source`` (the uncorrupted embeddings); KEPT and UNTOUCHED positions are left as they are."""
    copied = tokens.gather(1, source.unsqueeze(-1).expand_as(tokens))  # (B, N, C): identity where source[i] == i
    masked = (mode == MASKED).unsqueeze(-1)
    return torch.where(masked, mask_token.to(tokens.dtype).expand_as(tokens), copied)


class MaskedPatchParts(nn.Module):
    """What self-supervision adds to a ViT: the learned [mask] embedding and the per-patch colour classifier."""

    def __init__(self, embed_dim: int, num_colours: int, norm: bool):
        super().__init__()
        self.mask_token = nn.Parameter(torch.empty(embed_dim))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_colours)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)


class MaskedPatchViT(nn.Module):
    """A ViT trained to predict the quantised mean colour of its corrupted patches.

    ``forward(x, mode, source)`` gives colour logits ``(B, N, num_colours)`` for every patch (the loss reads the
    corrupted ones); without ``mode`` nothing is corrupted. :meth:`features` is the ViT's pooled representation (its
    own ``global_pool``, before any classifier), which the linear probe and fine-tuning use.

    Args:
        backbone: a ViT from ``create_model`` (any ``vit_*`` / ``deit_*``, hybrids included), without a classifier.
        num_colours: classes per patch, ``(2 ** bits) ** in_chans``: 512 for RGB at 3 bits.
    """

    def __init__(self, backbone: VisionTransformer, num_colours: int):
        super().__init__()
        if not isinstance(backbone, VisionTransformer):
            name = getattr(backbone, "model_name", type(backbone).__name__)
            raise ValueError(f"masked patch prediction needs a ViT (vit_* / deit_*), got {name!r}")
        self.backbone = backbone
        # a mean-pooled ViT normalises the pooled vector (fc_norm), not its tokens: the colour head gets its own norm
        self.mpp = MaskedPatchParts(backbone.embed_dim, num_colours, norm=isinstance(backbone.norm, nn.Identity))
        self.num_colours = num_colours
        self.patch_size = tuple(backbone.patch_embed.reduction)  # input pixels per token, per axis
        self.model_name = f"masked_patch:{getattr(backbone, 'model_name', 'vit')}"

    def forward(
        self, x: torch.Tensor, mode: torch.Tensor | None = None, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        vit = self.backbone

        def corrupt(tokens: torch.Tensor) -> torch.Tensor:
            if tokens.shape[1] != mode.shape[1]:
                raise ValueError(
                    f"{self.model_name}: the corruption covers {mode.shape[1]} patches, the input has {tokens.shape[1]}"
                )
            return corrupt_embeddings(tokens, mode, source, self.mpp.mask_token)

        tokens, _ = vit._embed(x, corrupt if mode is not None else None)
        tokens = vit.norm(vit.run_blocks(vit.blocks, tokens))
        return self.mpp.head(self.mpp.norm(tokens[:, vit.num_prefix_tokens :]))  # (B, N, num_colours)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ViT's pooled representation ``(B, embed_dim)`` of uncorrupted images."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def no_weight_decay(self) -> set[str]:
        return {MPP_BACKBONE + k for k in self.backbone.no_weight_decay()} | {MPP_PARTS + "mask_token"}
