"""LaViT: "You Only Need Less Attention at Each Stage in Vision Transformers" (Zhang, Liu, Lin, He; CVPR 2024,
arXiv 2406.00427). No official code exists; this is vitkit's implementation from the facts in
ARCHITECTURES.md §3. Every choice the available text leaves open is a named option of
:mod:`vitkit.layers.less_attention`, whose docstring says which source each default follows.

Layout (ours, not the paper's: the paper's variant tables were not available, and no number here is the
paper's): a PVT-v1-like hierarchy of 4 stages at strides 4/8/16/32 (patch embedding conv + LayerNorm, learned
position embedding per stage, pre-norm blocks, spatial-reduction attention with ratios 8/4/2/1 so stage-1
attention stays affordable). In each stage the first ``num_va[i]`` blocks compute vanilla attention, the rest are
Less-Attention blocks that transform the previous block's scores. The last scores of a stage are downsampled
(:class:`AttentionDownsample`) and added to the next stage's first vanilla scores, or, in a stage with no vanilla
layers, used as its starting attention. LA layers are placed where the token count is small (stages 3-4 at
224 px), because a transform of an N x N map costs O(N^3): see ``benchmarks/lavit`` for where that pays off.

The isotropic ``lavit_small_patch32_224`` is ViT-S-sized (width 384, 12 blocks, 6 heads, 32 px patches, 49
tokens, no class token, mean pooling) as 3 groups of 4 blocks, each group starting with one vanilla block.

Choices the available text leaves open, the option that selects each, and the source of our default (details
and reasoning in :mod:`vitkit.layers.less_attention`):

* pre- vs post-softmax carry: ``carry='pre'`` (read from the LA equation re-applying softmax; seed slides);
* residual in the LA update: ``residual=False`` (the review's transcription shows none);
* Theta/Psi shared across heads: ``share_heads=True`` (ours; unknown in the paper);
* attention downsampling across stages: ``inherit=True``, grid pooling + head mixing (ours; a third-party note
  describes a 4x4/4 conv on the matrix, which does not align with 2x2 token merging);
* DP loss weighting: ``dp_reduction='mean'`` on LA probabilities (ours; 'sum' weighs large maps more, as the
  seed slides say of the paper's loss); the loss weight itself belongs to the training recipe;
* the 4-stage PVT-like layout, SRA ratios, widths, depths and where LA layers sit: ours (the paper's are unknown).

Input size: LA maps are N x N learned matrices, so a model is built for one ``img_size`` (any multiple of 32);
other input sizes are an error that names the size the model was built for.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers import DropPath, Mlp, drop_path_schedule
from vitkit.layers.helpers import trunc_normal_linears_
from vitkit.layers.less_attention import AttentionDownsample, LessAttention, VanillaAttention, dp_loss
from vitkit.models._base import FeatureInfo, VitkitModel, check_img_size
from vitkit.models._registry import default_cfg, register_variant

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class LaViTBlock(nn.Module):
    """Pre-norm block whose attention is vanilla (computes scores) or less-attention (transforms them)."""

    def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, less, num_queries, num_keys, drop_path, drop, la_kwargs):
        super().__init__()
        self.less = less
        self.norm1 = LayerNorm(dim)
        if less:
            self.attn = LessAttention(
                dim, num_heads, num_queries, num_keys, sr_ratio=sr_ratio, proj_drop=drop, **la_kwargs
            )
        else:
            self.attn = VanillaAttention(dim, num_heads, sr_ratio=sr_ratio, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x, grid, carried):
        y, carried, probs = self.attn(self.norm1(x), grid, carried)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), carried, probs


class LaViTStage(nn.Module):
    def __init__(
        self,
        in_dim,
        dim,
        patch,
        grid,
        num_heads,
        depth,
        num_va,
        mlp_ratio,
        sr_ratio,
        dpr,
        drop,
        la_kwargs,
        inherit_from_heads,
    ):
        super().__init__()
        if patch > 1 or in_dim != dim:
            self.patch_embed = nn.Conv2d(in_dim, dim, patch, patch)
            self.embed_norm = LayerNorm(dim)
            self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:  # isotropic continuation: same tokens, no new embedding
            self.patch_embed = self.embed_norm = None
            self.pos_embed = None
        self.grid = grid
        self.key_grid = (grid[0] // sr_ratio, grid[1] // sr_ratio)
        n, m = grid[0] * grid[1], self.key_grid[0] * self.key_grid[1]
        self.inherit = AttentionDownsample(inherit_from_heads, num_heads) if inherit_from_heads else None
        if num_va == 0 and self.inherit is None:
            raise ValueError("LaViT: the first stage needs at least one vanilla-attention layer")
        self.blocks = nn.ModuleList(
            LaViTBlock(dim, num_heads, mlp_ratio, sr_ratio, i >= num_va, n, m, dpr[i], drop, la_kwargs)
            for i in range(depth)
        )
        self.norm = LayerNorm(dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW map (or tokens, isotropic) -> tokens ``[B, N, C]`` with position embedding."""
        if self.patch_embed is None:
            return x
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.embed_norm(x) + self.pos_embed


class LaViT(VitkitModel):
    """Less-Attention Vision Transformer (hierarchical, or isotropic with ``patch_sizes=(p, 1, 1, ...)``)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: tuple[int, ...] = (64, 128, 320, 512),
        num_heads: tuple[int, ...] = (1, 2, 5, 8),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        num_va: tuple[int, ...] = (2, 2, 1, 1),
        mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        patch_sizes: tuple[int, ...] = (4, 2, 2, 2),
        inherit: bool = True,
        share_heads: bool = True,
        residual: bool = False,
        carry: str = "pre",
        dp_reduction: str = "mean",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        """
        Args:
            img_size: the default (and only) input size; sets the attention maps' sizes. Each side must be a multiple
                of every stage's total stride times its sr_ratio (32 for the registered variants).
            num_va: vanilla-attention layers at the start of each stage; the rest are less-attention layers.
            inherit: carry each stage's last attention into the next stage (residual-based downsampling).
            share_heads, residual, carry: less-attention options (see vitkit.layers.less_attention).
            dp_reduction: 'mean' or 'sum' for the DP loss.
        """
        super().__init__()
        n = len(depths)
        for arg, val in (
            ("embed_dims", embed_dims),
            ("num_heads", num_heads),
            ("num_va", num_va),
            ("mlp_ratios", mlp_ratios),
            ("sr_ratios", sr_ratios),
            ("patch_sizes", patch_sizes),
        ):
            if len(val) != n:
                raise ValueError(f"LaViT: {arg} needs one entry per stage ({n}), got {tuple(val)}")
        if any(v > d for v, d in zip(num_va, depths)):
            raise ValueError(f"LaViT: num_va {tuple(num_va)} exceeds depths {tuple(depths)}")
        # every stage's token grid must divide by its spatial reduction: sides are multiples of stride_i * sr_i
        strides = [math.prod(patch_sizes[: i + 1]) for i in range(n)]
        self.input_multiple = math.lcm(*(t * r for t, r in zip(strides, sr_ratios)))
        self.img_size = check_img_size(self.name, img_size, self.input_multiple, "every stage's stride x sr_ratio")
        self.in_chans, self.num_classes, self.drop_rate = in_chans, num_classes, drop_rate
        self.num_features = embed_dims[-1]
        self.dp_reduction = dp_reduction
        self.record_attention = False
        self.attention_record: list[dict] = []
        la_kwargs = dict(share_heads=share_heads, residual=residual, carry=carry)
        dpr = drop_path_schedule(drop_path_rate, sum(depths))
        stages, prev_dim, grid, r = [], in_chans, self.img_size, 1
        self.feature_info = FeatureInfo()
        for i in range(n):
            r *= patch_sizes[i]
            grid = (grid[0] // patch_sizes[i], grid[1] // patch_sizes[i])
            inherit_heads = num_heads[i - 1] if (inherit and i > 0) else 0
            rates = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            stages.append(
                LaViTStage(
                    prev_dim,
                    embed_dims[i],
                    patch_sizes[i],
                    grid,
                    num_heads[i],
                    depths[i],
                    num_va[i],
                    mlp_ratios[i],
                    sr_ratios[i],
                    rates,
                    drop_rate,
                    la_kwargs,
                    inherit_heads,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=r, module=f"stages.{i}"))
            prev_dim = embed_dims[i]
        self.stages = nn.ModuleList(stages)
        for i, stage in enumerate(self.stages[:-1]):
            if self.stages[i + 1].patch_embed is None:  # isotropic continuation: tokens flow on un-normalised
                stage.norm = nn.Identity()
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_linears_(self)

    def no_weight_decay(self) -> set[str]:
        return {f"stages.{i}.pos_embed" for i, s in enumerate(self.stages) if s.pos_embed is not None}

    def _stage_forward(self, i: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Stage ``i`` on the previous stage's tokens; ``ctx`` carries the attention into the next stage.

        Each stage ends with its norm (PVT-v2 style). Tokens become the previous stage's NCHW map where this
        stage embeds patches again; an isotropic continuation takes the tokens as they are.
        """
        stage = self.stages[i]
        if i > 0 and stage.patch_embed is not None:
            x = self._to_map(i - 1, x)
        x = stage.embed(x)  # (B, N, C)
        carried = ctx["carried"]
        if carried is not None and stage.inherit is not None:
            carried = stage.inherit(carried, *ctx["grids"], stage.grid, stage.key_grid)
        else:
            carried = None
        for j, blk in enumerate(stage.blocks):
            if self.grad_checkpointing and self.training:
                x, new, probs = torch.utils.checkpoint.checkpoint(blk, x, stage.grid, carried, use_reentrant=False)
            else:
                x, new, probs = blk(x, stage.grid, carried)
            carried = new
            if self.training or self.record_attention:
                self.attention_record.append(
                    dict(stage=i, layer=j, less=blk.less, probs=probs, grid=stage.grid, key_grid=stage.key_grid)
                )
        ctx.update(carried=carried, grids=(stage.grid, stage.key_grid), stage=i)
        return stage.norm(x)

    def _to_map(self, i: int, x: torch.Tensor) -> torch.Tensor:
        g = self.stages[i].grid
        return x.transpose(1, 2).reshape(x.shape[0], -1, *g)  # (B, C, h, w)

    # forward_intermediates / prune_intermediate_layers (VitkitModel): each stage's normalised tokens as a map
    def _stages_input(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        self.check_input(x, (1, 1), self.img_size)
        self.attention_record = []
        # the last stage run, its last attention and its (query, key) grids
        return x, dict(stage=None, carried=None, grids=None)

    def _stage_output(self, i: int, x: torch.Tensor, ctx: dict, norm: bool, output_fmt: str) -> torch.Tensor:
        return self._to_map(i, x)

    def _stages_final(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return self._to_map(ctx["stage"], x)  # (B, C, h, w)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, ctx = self._stages_input(x)
        for i in range(len(self.stages)):
            x = self._stage_forward(i, x, ctx)
        return self._stages_final(x, ctx)

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """Losses for the training loop to add with a recipe weight: {'dp': Diagonality Preserving loss}.

        Computed from the attention of the LA layers in the most recent training forward. Maps over spatially
        reduced keys are made square by pooling their query grid to the key grid (query region x key region).
        """
        maps = []
        for rec in self.attention_record:
            if not rec["less"]:
                continue
            p = rec["probs"]
            if rec["grid"] != rec["key_grid"]:
                B, H, N, M = p.shape
                p = p.transpose(2, 3).reshape(B * H * M, 1, *rec["grid"])
                p = F.adaptive_avg_pool2d(p, rec["key_grid"]).reshape(B, H, M, M).transpose(2, 3) * (N / M)
            maps.append(p)
        return {"dp": dp_loss(maps, self.dp_reduction)} if maps else {}


# ---- variants (ours; see the module docstring) ----------------------------------------------------
_HIER = {
    "lavit_tiny": dict(depths=(2, 2, 2, 2), num_va=(2, 2, 1, 1)),
    "lavit_small": dict(depths=(3, 4, 6, 3), num_va=(3, 4, 2, 1)),
    "lavit_base": dict(depths=(3, 4, 18, 3), num_va=(3, 4, 6, 1)),
}
_ISO = {
    "lavit_small_patch32_224": dict(
        embed_dims=(384,) * 3,
        num_heads=(6,) * 3,
        depths=(4, 4, 4),
        num_va=(1, 1, 1),
        mlp_ratios=(4,) * 3,
        sr_ratios=(1,) * 3,
        patch_sizes=(32, 1, 1),
    ),
}


def _register(name: str, args: dict, test_size: int) -> None:
    cfg = default_cfg(crop_pct=0.9, first_conv="stages.0.patch_embed", test_input_size=(3, test_size, test_size))
    register_variant(name, LaViT, args, family="lavit", cfg=cfg)


for _k, _v in _HIER.items():
    _register(_k, _v, 64)
for _k, _v in _ISO.items():
    _register(_k, _v, 96)
