"""NesT generator: the nested hierarchy run backwards, from a noise vector to an image (NesT paper, GAN section).

Paper: Zhang et al., "Nested Hierarchical Transformer", AAAI 2022 (arXiv 2105.12723), which reports a NesT-based
generator ("block aggregation replaced by block de-aggregation with pixel shuffle") that trains more easily and
converges faster than a comparable SAGAN. The official repository has no generator code, so this is our reading
of the paper's description (ARCHITECTURES.md §5.4):

    noise z (B, latent_dim) -> a linear map to the top-level block(s) (B, T_0 = 1, N, D_0)
    -> per level: [block de-aggregation] -> +pos-embed -> local Transformer layers in every block (shared weights)
    -> final LayerNorm -> 1x1 projection to ``in_chans * p * p`` channels, pixel shuffle by the patch size ``p`` -> tanh

*Block de-aggregation* mirrors NesT's block aggregation (3x3 conv -> LayerNorm -> 3x3/2 max-pool) on the image
plane: 3x3 conv D_l -> 4 D_{l+1} -> pixel shuffle 2x (depth-to-space: channels / 4, height and width x 2) ->
LayerNorm, then re-blockify with the same block size. The pixel shuffle splits every block into four children
(a 2x2 group of blocks of the next level), so level ``l`` holds ``4^l`` blocks; the 3x3 conv before it is what
lets neighbouring blocks communicate, as the aggregation's conv does in the classifier. :func:`deaggregate_blocks`
is that spatial rearrangement alone, the exact inverse of :func:`aggregate_blocks` (unblockify -> pixel unshuffle
-> blockify). The levels are :class:`vitkit.models.nest.NestLevel` (standard multi-head attention, pre-LN,
LayerNorm eps 1e-6), with the de-aggregation in the place of their aggregation.

Sizes: ``img_size`` sides must be multiples of ``patch_size * 2^(num_levels-1)`` (the block side in tokens is what
is left); blocks may be rectangular, as in :class:`vitkit.models.nest.Nest`. ``in_chans`` is the number of image
channels the generator makes. Output in [-1, 1]. Trained with ``vitkit train`` by the ``gan`` task
(:mod:`vitkit.tasks.generation`), which pairs it with a discriminator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers import Attention, LayerNorm2d, drop_path_schedule
from vitkit.models._base import check_img_size
from vitkit.models._registry import INCEPTION_MEAN, INCEPTION_STD, default_cfg, register_variant
from vitkit.models.nest import NestLevel, NestLevelsMixin, blockify, unblockify


def deaggregate_blocks(x: torch.Tensor, grid: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Pixel-shuffle de-aggregation of a block grid: ``(B, T, N, 4C)`` -> ``(B, 4T, N, C)`` on a ``2x`` finer grid.

    Each block becomes a 2x2 group of child blocks of the same size; channel ``4c + 2i + j`` of the token at
    ``(y, x)`` becomes channel ``c`` of the token at ``(2y + i, 2x + j)`` (``torch.nn.functional.pixel_shuffle``).
    """
    img = unblockify(x, grid, block).permute(0, 3, 1, 2)  # (B, 4C, H, W)
    img = F.pixel_shuffle(img, 2).permute(0, 2, 3, 1)  # (B, 2H, 2W, C)
    return blockify(img, block)


def aggregate_blocks(x: torch.Tensor, grid: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """The inverse rearrangement: ``(B, 4T, N, C)`` on ``grid`` -> ``(B, T, N, 4C)`` on ``grid / 2``: every 2x2 group
    of blocks merged into one parent block by pixel unshuffle (space-to-depth), nothing lost."""
    img = unblockify(x, grid, block).permute(0, 3, 1, 2)  # (B, C, H, W)
    img = F.pixel_unshuffle(img, 2).permute(0, 2, 3, 1)  # (B, H/2, W/2, 4C)
    return blockify(img, block)


class BlockDeaggregation(nn.Module):
    """3x3 conv ``in_dim -> 4 out_dim`` -> pixel shuffle 2x -> LayerNorm over channels, on the image plane (NCHW).

    Blockified afterwards by its level, it gives the blocks of :func:`deaggregate_blocks` of the conv's output.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, 4 * out_dim, 3, padding=1)
        self.norm = LayerNorm2d(out_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.pixel_shuffle(self.conv(x), 2))  # (B, C', 2H, 2W)


class NestGenerator(NestLevelsMixin, nn.Module):
    """NesT generator: noise -> top-level block -> local Transformer levels joined by block de-aggregation -> image."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        in_chans: int = 3,
        latent_dim: int = 128,
        patch_size: int = 2,
        num_levels: int = 3,
        embed_dims: tuple[int, ...] = (128, 64, 32),
        num_heads: tuple[int, ...] = (4, 2, 1),
        depths: tuple[int, ...] = (2, 2, 2),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
    ):
        """
        Args:
            img_size: the generated image size; each side a multiple of ``patch_size * 2^(num_levels-1)``.
            in_chans: channels of the generated images.
            latent_dim: length of the noise vector.
            patch_size: pixels per token side at the finest level (the final pixel shuffle).
            num_levels: hierarchy depth; level ``l`` (0 = top) holds ``4^l`` blocks.
            embed_dims, num_heads, depths: one entry per level, top level first.
        """
        super().__init__()
        name = "NestGenerator"
        for arg, val in (("embed_dims", embed_dims), ("num_heads", num_heads), ("depths", depths)):
            if len(val) != num_levels:
                raise ValueError(f"{name}: {arg} needs one entry per level ({num_levels}), got {tuple(val)}")
        self.in_chans, self.latent_dim, self.patch_size = in_chans, latent_dim, patch_size
        self.input_multiple = patch_size * 2 ** (num_levels - 1)
        self.img_size = check_img_size(name, img_size, self.input_multiple, "patch_size * 2^(num_levels-1)")
        self.block = (self.img_size[0] // self.input_multiple, self.img_size[1] // self.input_multiple)
        self.embed_dims = tuple(embed_dims)
        # noise -> the one top-level block on the image plane: (B, D_0, bh, bw)
        self.stem = nn.Linear(latent_dim, embed_dims[0] * self.block[0] * self.block[1])
        dpr = drop_path_schedule(drop_path_rate, sum(depths))
        levels = []
        for i in range(num_levels):
            rates = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            level = NestLevel((2**i, 2**i), self.block, embed_dims[i], None, depths[i], num_heads[i], mlp_ratio,
                              qkv_bias, 0.0, 0.0, rates, "", Attention)  # fmt: skip
            if i > 0:  # de-aggregation where the classifier aggregates
                level.pool = BlockDeaggregation(embed_dims[i - 1], embed_dims[i])
            levels.append(level)
        self.levels = nn.Sequential(*levels)
        self.norm = LayerNorm2d(embed_dims[-1], eps=1e-6)
        self.head = nn.Conv2d(embed_dims[-1], in_chans * patch_size**2, 1)  # per token: its p x p pixels
        self._init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for level in self.levels:
            level.grad_checkpointing = enable

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` standard-normal noise vectors ``(n, latent_dim)``."""
        return torch.randn(n, self.latent_dim, generator=generator, device=self.stem.weight.device)

    def forward_levels(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Each level's output map ``(B, D_l, 2^l bh, 2^l bw)``, top level first."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"{self.name}: expected noise of shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        x = self.stem(z).view(len(z), self.embed_dims[0], *self.block)  # (B, D_0, bh, bw): the top block
        out = []
        for level in self.levels:
            x = level(x)
            out.append(x)
        return out

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.head(self.norm(self.forward_levels(z)[-1]))  # (B, C p^2, H/p, W/p)
        return torch.tanh(F.pixel_shuffle(x, self.patch_size))  # (B, C, H, W) in [-1, 1]

    @property
    def name(self) -> str:
        return getattr(self, "model_name", "") or type(self).__name__


def generator_cfg() -> dict:
    """The registry config of a generator (here and in :mod:`vitkit.tasks.generation.models`): trained by the gan
    task; its images are in [-1, 1], i.e. normalised with mean = std = 0.5 from [0, 1] pixels."""
    return default_cfg(
        task="gan",
        input_size=(3, 32, 32),
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        crop_pct=1.0,
        first_conv=None,
        classifier=None,
        test_input_size=(1, 32, 32),
    )


# ---- variants ---------------------------------------------------------------------------------
# 32x32 images, 2x2-pixel tokens, 4x4-token blocks: 1 / 4 / 16 blocks at 4x4 / 8x8 / 16x16 tokens
_VARIANTS = {
    "tiny": dict(embed_dims=(128, 64, 32), num_heads=(4, 2, 1), depths=(2, 2, 2)),
    "small": dict(embed_dims=(256, 128, 64), num_heads=(4, 4, 2), depths=(2, 2, 2)),
}
for _size, _args in _VARIANTS.items():
    register_variant(f"nest_gen_{_size}", NestGenerator, _args, family="nest_gen", cfg=generator_cfg())
