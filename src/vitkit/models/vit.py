"""Vision Transformer (ViT) and DeiT.

Papers: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021 (arXiv 2010.11929);
Touvron et al., "Training data-efficient image transformers", ICML 2021 (arXiv 2012.12877).
Reference implementation: timm ``vision_transformer.py`` (parameter names and numerics match it, so
timm checkpoints load unchanged; see ``../shared/golden`` parity tests).

Deviations from the reference: none in the forward pass. vitkit adds input checks that name the model,
and position embeddings are resampled bicubically (antialiased) when a checkpoint for another grid is
loaded or, with ``dynamic_img_size=True``, per input size.

Position-embedding study (the ViT paper's appendix D.4 ablation; the default is the paper's and timm's model,
unchanged): ``pos_embed`` is one of

* ``"learn1d"`` (default): one learned D-vector per token, class token included (``pos_embed`` (P, 1 + N, D));
* ``"none"``: no position information;
* ``"learn2d"``: the patch at row y, column x gets ``concat(X[x], Y[y])``, two learned tables of D/2
  (``pos_embed_x`` (P, W, D/2), ``pos_embed_y`` (P, H, D/2)), X first. The class token gets no position
  embedding (ours: the paper does not say; it is itself a learned vector);
* ``"relative"``: 1-D relative attention over the flattened patch sequence, a learned query-dependent logit per
  head per offset in every block (:mod:`vitkit.layers.rel_pos`, which documents our choices: per-head per-block
  tables, three class-token entries, offsets clipped at other sizes).

and ``pos_embed_every_layer`` (learned 1-D / 2-D only, as in the paper's table) one of ``"input"`` (default: added
once, after the patch embedding), ``"every"`` (a separate learned embedding added to the input of each block,
P = depth) or ``"every_shared"`` (one embedding added to the input of each block, P = 1). The per-block additions
get no dropout (ours). At another grid size the 1-D embedding is resampled as above, the 2-D X and Y tables
linearly along their axis.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from vitkit.layers import Block, PatchEmbed, drop_path_schedule, resample_abs_pos_embed
from vitkit.layers.attention import token_attention_cells
from vitkit.layers.helpers import trunc_normal_linears_
from vitkit.layers.pos_embed import resample_axis_pos_embed
from vitkit.layers.rel_pos import RelPosAttention, resize_relative_table
from vitkit.models._base import FeatureInfo, ModelArgError, VitkitModel, check_img_size
from vitkit.models._hf import rename, strip_prefix, transformer_layers
from vitkit.models._registry import INCEPTION_MEAN, INCEPTION_STD, PretrainedCfg, default_cfg, register_variant

if TYPE_CHECKING:
    from vitkit.interpret import AttentionRecord
    from vitkit.interpret.geometry import ImageQuery


POS_EMBEDS = ("learn1d", "learn2d", "relative", "none")
POS_EMBED_EVERY_LAYER = ("input", "every", "every_shared")


class VisionTransformer(VitkitModel):
    """ViT: patch tokens + class token + learned position embedding -> pre-norm encoder -> head."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        embed_layer=PatchEmbed,
        pos_embed: str = "learn1d",
        pos_embed_every_layer: str = "input",
    ):
        """
        Args:
            img_size: the default input size; the position embedding has one entry per patch of it. Each side must
                be a multiple of the patch size (of the CNN stem's stride times the patch size for hybrids).
            global_pool: 'token' (class token), 'avg' (mean of patch tokens) or '' (no pooling).
            dynamic_img_size: accept any input whose sides are multiples of the patch size, resampling
                the position embedding per call.
            drop_rate: dropout after position embedding, in MLPs and attention outputs, before the head.
            embed_layer: patch embedding module (``PatchEmbed``, or a ``HybridEmbed`` with a CNN stem).
            pos_embed: 'learn1d' (default), 'learn2d', 'relative' or 'none' (module docstring).
            pos_embed_every_layer: 'input' (default), 'every' or 'every_shared'; the last two with 'learn1d' and
                'learn2d' only.
        """
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"VisionTransformer: global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("VisionTransformer: global_pool='token' needs class_token=True")
        if pos_embed not in POS_EMBEDS:
            raise ModelArgError("VisionTransformer", f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if pos_embed_every_layer not in POS_EMBED_EVERY_LAYER:
            raise ModelArgError(
                "VisionTransformer",
                f"pos_embed_every_layer must be one of {POS_EMBED_EVERY_LAYER}, got {pos_embed_every_layer!r}",
            )
        if pos_embed_every_layer != "input" and pos_embed not in ("learn1d", "learn2d"):
            raise ModelArgError(
                "VisionTransformer",
                f"pos_embed_every_layer={pos_embed_every_layer!r} needs pos_embed 'learn1d' or 'learn2d' (the paper's "
                f"ablation adds only learned absolute embeddings per layer), got pos_embed={pos_embed!r}",
            )
        if pos_embed == "learn2d" and embed_dim % 2:
            raise ModelArgError(
                "VisionTransformer",
                f"pos_embed='learn2d' needs an even embed_dim (D/2 for X, D/2 for Y), got {embed_dim}",
            )
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.num_prefix_tokens = 1 if class_token else 0
        self.dynamic_img_size = dynamic_img_size

        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        # the position embedding is sized for img_size, so its sides must be whole numbers of patches
        rule = "the patch size" if embed_layer is PatchEmbed else "the patch embedding's stride"
        self.img_size = check_img_size(self.name, img_size, self.patch_embed.reduction, rule)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed_type, self.pos_embed_every_layer = pos_embed, pos_embed_every_layer
        n_pos = depth if pos_embed_every_layer == "every" else 1  # P: one embedding per block, or one
        self.pos_embed = self.pos_embed_x = self.pos_embed_y = None
        if pos_embed == "learn1d":
            self.pos_embed = nn.Parameter(torch.zeros(n_pos, num_patches + self.num_prefix_tokens, embed_dim))
        elif pos_embed == "learn2d":
            gh, gw = self.patch_embed.grid_size
            self.pos_embed_x = nn.Parameter(torch.zeros(n_pos, gw, embed_dim // 2))
            self.pos_embed_y = nn.Parameter(torch.zeros(n_pos, gh, embed_dim // 2))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = drop_path_schedule(drop_path_rate, depth)
        attn_layer = {}
        if pos_embed == "relative":
            rel = partial(RelPosAttention, max_patches=num_patches, num_prefix_tokens=self.num_prefix_tokens)
            attn_layer = dict(attn_layer=rel)
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    dpr[i],
                    norm_layer=norm_layer,
                    **attn_layer,
                )
                for i in range(depth)
            ]
        )
        # final norm on tokens for 'token' pooling; on the pooled vector (fc_norm) for 'avg' pooling
        use_fc_norm = global_pool == "avg"
        self.norm = norm_layer(embed_dim) if not use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        r = self.patch_embed.reduction
        self.feature_info = FeatureInfo(
            dict(num_chs=embed_dim, reduction=r[0], module=f"blocks.{i}") for i in range(depth)
        )
        self.default_out_indices = min(3, depth)  # the last three blocks, as timm's ViT features
        self._init_weights()

    def _init_weights(self) -> None:
        for pe in (self.pos_embed, self.pos_embed_x, self.pos_embed_y):
            if pe is not None:
                nn.init.trunc_normal_(pe, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        trunc_normal_linears_(self)

    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "pos_embed_x", "pos_embed_y", "cls_token"}
        rel = {n for n, _ in self.named_parameters() if n.endswith(".rel_table")}
        return {n for n in names if getattr(self, n) is not None} | rel

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"{self.name}: global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor, corrupt: Callable | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image -> tokens with prefix and position embedding. Returns tokens and the patch grid.

        ``corrupt`` maps the patch embeddings ``(B, N, C)`` before the prefix tokens and the position embedding are
        added: where masked patch prediction (:mod:`vitkit.tasks.masked_patch`) corrupts them, as the paper does.
        """
        r = self.patch_embed.reduction
        fixed = None if self.dynamic_img_size else self.patch_embed.img_size
        self.check_input(x, r, fixed)
        grid = (x.shape[-2] // r[0], x.shape[-1] // r[1])
        x = self.patch_embed(x)  # (B, N, C)
        if corrupt is not None:
            x = corrupt(x)
        if self.pos_embed is None:  # 'learn2d' (patch tokens only), 'relative' (in the blocks) or 'none'
            if self.cls_token is not None:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            return self.pos_drop(self._add_pos(x, 0, grid)), grid
        pos_embed = self.pos_embed[:1]
        if self.dynamic_img_size and grid != self.patch_embed.grid_size:
            pos_embed = resample_abs_pos_embed(pos_embed, grid, self.patch_embed.grid_size, self.num_prefix_tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos_embed), grid

    def _add_pos(self, x: torch.Tensor, i: int, grid: tuple[int, int]) -> torch.Tensor:
        """``x`` plus the learned position embedding of block ``i``'s input (entry i of P, or the one shared)."""
        if self.pos_embed is not None:  # learn1d: class token included
            j = min(i, self.pos_embed.shape[0] - 1)
            pe = self.pos_embed[j : j + 1]
            if grid != self.patch_embed.grid_size:
                pe = resample_abs_pos_embed(pe, grid, self.patch_embed.grid_size, self.num_prefix_tokens)
            return x + pe
        if self.pos_embed_x is None:  # 'none', 'relative'
            return x
        j = min(i, self.pos_embed_x.shape[0] - 1)
        ex = resample_axis_pos_embed(self.pos_embed_x[j : j + 1], grid[1])  # (1, W, D/2)
        ey = resample_axis_pos_embed(self.pos_embed_y[j : j + 1], grid[0])  # (1, H, D/2)
        pe = torch.cat([ex[:, None].expand(-1, grid[0], -1, -1), ey[:, :, None].expand(-1, -1, grid[1], -1)], dim=-1)
        pe = pe.reshape(1, grid[0] * grid[1], -1)  # (1, N, D), row-major as the patch tokens
        return torch.cat([x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :] + pe], dim=1)

    def _run_block(self, i: int, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if i > 0 and self.pos_embed_every_layer != "input":
            x = self._add_pos(x, i, grid)
        return self.run_blocks([self.blocks[i]], x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self._embed(x)
        if self.pos_embed_every_layer == "input":
            x = self.run_blocks(self.blocks, x)
        else:
            for i in range(len(self.blocks)):
                x = self._run_block(i, x, grid)
        return self.norm(x)  # (B, prefix + N, C)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def attention_geometry(self, record: AttentionRecord, query: ImageQuery) -> torch.Tensor:
        """Every block's attention (B, heads, prefix + N, prefix + N): the query token's row on the patch grid,
        prefix tokens dropped (see :mod:`vitkit.interpret.geometry`)."""
        return token_attention_cells(record.probs, query, record.grid, prefix=self.num_prefix_tokens)

    # forward_intermediates / prune_intermediate_layers (VitkitModel) over the blocks; outputs of patch tokens
    feature_stages = "blocks"
    intermediate_formats = ("NCHW", "NLC")

    def _stages_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return self._embed(x)  # tokens, and the patch grid the outputs are reshaped to

    def _stage_forward(self, i: int, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self._run_block(i, x, grid)

    def _stage_output(self, i: int, x: torch.Tensor, grid: tuple[int, int], norm: bool, output_fmt: str):
        """A block's tokens as an NCHW map of patch tokens, or as 'NLC' tokens with the prefix."""
        y = self.norm(x) if norm else x
        if output_fmt == "NCHW":
            y = y[:, self.num_prefix_tokens :]  # (B, N, C) -> (B, C, H, W)
            y = y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
        return y

    def _stages_final(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.norm(x)

    def _prune_tail(self) -> None:
        """The final norm, the pooled-vector norm and the head go; pooling is switched off."""
        self.norm = nn.Identity()
        self.fc_norm = nn.Identity()
        self.reset_classifier(0, "")


_HF_RULES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


def hf_to_vitkit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ViT state dict (``ViTForImageClassification`` / ``ViTModel``, the Hub's layout or
    transformers 5's) in timm/vitkit's; the pooler of a ``ViTModel``, which no head here uses, is left out."""
    sd = {k: v for k, v in strip_prefix(state_dict, "vit.").items() if not k.startswith("pooler.")}
    return rename(transformer_layers(sd, r"(?:encoder\.layer|layers)", "blocks"), _HF_RULES)


# A masked-patch-prediction run (vitkit.tasks.masked_patch.MaskedPatchViT) saves the ViT under ``backbone.`` and its
# self-supervision parts (the [mask] embedding, the per-patch colour classifier) under ``mpp.``.
MPP_BACKBONE, MPP_PARTS = "backbone.", "mpp."


def masked_patch_backbone(state_dict: dict[str, torch.Tensor], name: str = "ViT") -> dict[str, torch.Tensor]:
    """The ViT inside a masked-patch-prediction state dict (``backbone.*``, prefix stripped; ``mpp.*`` dropped).

    A state dict without ``mpp.*`` keys is returned as it is. One with ``mpp.*`` keys and keys outside the two
    prefixes is not one vitkit wrote: an error naming them, rather than a guess.
    """
    if not any(k.startswith(MPP_PARTS) for k in state_dict):
        return state_dict
    other = [k for k in state_dict if not k.startswith((MPP_BACKBONE, MPP_PARTS))]
    if other or not any(k.startswith(MPP_BACKBONE) for k in state_dict):
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise ValueError(
            f"{name}: the checkpoint holds masked-patch-prediction parts ({MPP_PARTS}*) but "
            + (f"also keys outside {MPP_BACKBONE}* ({shown})" if other else f"no {MPP_BACKBONE}* weights")
            + "; a vitkit masked_patch run saves exactly those two prefixes"
        )
    n = len(MPP_BACKBONE)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(MPP_BACKBONE)}


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Adapt a timm/vitkit ViT state dict to ``model``: resample the position embedding to its grid.

    A transformers checkpoint (recognised by ``embeddings.patch_embeddings``) is converted first, and the model's
    LayerNorms take transformers' epsilon (1e-12, ``ViTConfig.layer_norm_eps`` of google/vit-*) instead of
    timm's 1e-6, which the weights were trained with. A masked-patch-prediction run gives its backbone (see
    :func:`masked_patch_backbone`); it has no classifier, so a model built with ``num_classes`` keeps a fresh one.
    """
    state_dict = masked_patch_backbone(state_dict, getattr(model, "model_name", "") or type(model).__name__)
    if any("embeddings.patch_embeddings.projection" in k for k in state_dict):
        state_dict = hf_to_vitkit(state_dict)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-12
    pe = state_dict.get("pos_embed")
    if pe is not None and model.pos_embed is not None and pe.shape != model.pos_embed.shape:
        state_dict["pos_embed"] = resample_abs_pos_embed(
            pe, model.patch_embed.grid_size, num_prefix_tokens=model.num_prefix_tokens
        )
    gh, gw = model.patch_embed.grid_size
    for key, n in (("pos_embed_x", gw), ("pos_embed_y", gh)):  # 'learn2d': each axis on its own
        if key in state_dict and getattr(model, key) is not None:
            state_dict[key] = resample_axis_pos_embed(state_dict[key], n)
    for key, table in state_dict.items():  # 'relative': the offset range follows the grid (clipped / extended)
        if key.endswith(".attn.rel_table"):
            state_dict[key] = resize_relative_table(table, gh * gw, model.num_prefix_tokens)
    return state_dict


# ---- variants ---------------------------------------------------------------------------------
# name: (patch, embed_dim, depth, heads, img_size)   [ARCHITECTURES.md §1.1; timm names]
VIT_VARIANTS = {
    "vit_tiny_patch16_224": (16, 192, 12, 3, 224),
    "vit_tiny_patch16_384": (16, 192, 12, 3, 384),
    "vit_small_patch32_224": (32, 384, 12, 6, 224),
    "vit_small_patch32_384": (32, 384, 12, 6, 384),
    "vit_small_patch16_224": (16, 384, 12, 6, 224),
    "vit_small_patch16_384": (16, 384, 12, 6, 384),
    "vit_small_patch8_224": (8, 384, 12, 6, 224),
    "vit_base_patch32_224": (32, 768, 12, 12, 224),
    "vit_base_patch32_384": (32, 768, 12, 12, 384),
    "vit_base_patch16_224": (16, 768, 12, 12, 224),
    "vit_base_patch16_384": (16, 768, 12, 12, 384),
    "vit_base_patch8_224": (8, 768, 12, 12, 224),
    "vit_large_patch32_224": (32, 1024, 24, 16, 224),
    "vit_large_patch32_384": (32, 1024, 24, 16, 384),
    "vit_large_patch16_224": (16, 1024, 24, 16, 224),
    "vit_large_patch16_384": (16, 1024, 24, 16, 384),
    "vit_large_patch14_224": (14, 1024, 24, 16, 224),
    "vit_huge_patch14_224": (14, 1280, 32, 16, 224),
    "deit_tiny_patch16_224": (16, 192, 12, 3, 224),
    "deit_small_patch16_224": (16, 384, 12, 6, 224),
    "deit_base_patch16_224": (16, 768, 12, 12, 224),
    "deit_base_patch16_384": (16, 768, 12, 12, 384),
}

# published timm weights per architecture: tag -> (licence, crop_pct); inputs at the variant's size
_VIT_TAGS = {
    "vit_tiny_patch16_224": ["augreg_in21k_ft_in1k"],
    "vit_tiny_patch16_384": ["augreg_in21k_ft_in1k"],
    "vit_small_patch32_224": ["augreg_in21k_ft_in1k"],
    "vit_small_patch32_384": ["augreg_in21k_ft_in1k"],
    "vit_small_patch16_224": ["augreg_in21k_ft_in1k", "augreg_in1k"],
    "vit_small_patch16_384": ["augreg_in21k_ft_in1k", "augreg_in1k"],
    "vit_small_patch8_224": ["dino"],
    "vit_base_patch32_224": ["augreg_in21k_ft_in1k", "augreg_in1k"],
    "vit_base_patch32_384": ["augreg_in21k_ft_in1k", "augreg_in1k"],
    "vit_base_patch16_224": ["augreg2_in21k_ft_in1k", "augreg_in21k_ft_in1k", "orig_in21k_ft_in1k", "augreg_in1k"],
    "vit_base_patch16_384": ["augreg_in21k_ft_in1k", "orig_in21k_ft_in1k", "augreg_in1k"],
    "vit_base_patch8_224": ["augreg2_in21k_ft_in1k", "augreg_in21k_ft_in1k"],
    "vit_large_patch32_224": ["orig_in21k"],
    "vit_large_patch32_384": ["orig_in21k_ft_in1k"],
    "vit_large_patch16_224": ["augreg_in21k_ft_in1k"],
    "vit_large_patch16_384": ["augreg_in21k_ft_in1k"],
    "vit_huge_patch14_224": ["orig_in21k"],
    "deit_tiny_patch16_224": ["fb_in1k"],
    "deit_small_patch16_224": ["fb_in1k"],
    "deit_base_patch16_224": ["fb_in1k"],
    "deit_base_patch16_384": ["fb_in1k"],
}


# weights published without a classifier: as in timm, a model built from scratch also defaults to no head
HEADLESS_TAGS = ("dino", "orig_in21k")


def _pretrained_cfgs(name: str, img: int) -> list[PretrainedCfg]:
    out = []
    for tag in _VIT_TAGS.get(name, []):
        deit = name.startswith("deit") or tag == "dino"
        out.append(
            PretrainedCfg(
                tag=tag,
                hf_hub_id=f"timm/{name}.{tag}",
                num_classes=0 if tag in HEADLESS_TAGS else 1000,
                input_size=(3, img, img),
                mean=default_cfg()["mean"] if deit else INCEPTION_MEAN,
                std=default_cfg()["std"] if deit else INCEPTION_STD,
                crop_pct=1.0 if img == 384 else (0.875 if deit else 0.9),
                license="apache-2.0",
            )
        )
    return out


def _register(name: str, patch: int, dim: int, depth: int, heads: int, img: int) -> None:
    args = dict(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads)
    deit = name.startswith("deit")
    cfg = default_cfg(
        input_size=(3, img, img),
        mean=default_cfg()["mean"] if deit else INCEPTION_MEAN,
        std=default_cfg()["std"] if deit else INCEPTION_STD,
        test_input_size=(3, 4 * patch, 4 * patch),
    )
    register_variant(
        name,
        VisionTransformer,
        args,
        family="vit",
        cfg=cfg,
        pretrained=_pretrained_cfgs(name, img),
        checkpoint_filter=checkpoint_filter_fn,
    )


for _name, _spec in VIT_VARIANTS.items():
    _register(_name, *_spec)
