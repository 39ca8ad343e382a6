"""Attention capture and the ViT paper's attention analyses.

* :func:`capture_attention`: inside the context manager every attention layer of a vitkit model runs its
  eager path and its probabilities (the output of the layer's ``attn_probs`` hook point) are recorded in call
  order; on exit the hooks are removed and the fused path is restored. Works for every family: ViT tokens,
  NesT blocks, MobileViT patch sequences (v2: separable context scores), HaloNet block windows, LaViT's
  vanilla and transformed attention.
* :func:`attention_rollout` (Abnar & Zuidema 2020), :func:`mean_attention_distance` (ViT paper Fig. 7),
  :func:`pos_embed_similarity` (ViT paper Fig. 7, centre).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.attention import use_fused_attn


@dataclass
class AttentionRecord:
    layer: str  # the attention module's name in the model
    probs: torch.Tensor  # as the layer computes them, e.g. (B, heads, N, N) for ViT
    module: nn.Module | None = None  # the attention module itself
    input_shape: tuple[int, ...] | None = None  # shape of its input (tokens or map) in this call
    grid: tuple[int, int] | None = None  # the token grid, for layers that are given one (LaViT)


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[AttentionRecord]]:
    """Record the attention probabilities of every attention layer while the block is active."""
    records: list[AttentionRecord] = []
    hooks = []
    inputs: dict[str, tuple] = {}

    def remember(owner: str, args: tuple) -> None:
        grid = next((a for a in args[1:] if isinstance(a, tuple) and len(a) == 2), None)
        inputs[owner] = (tuple(args[0].shape) if args and torch.is_tensor(args[0]) else None, grid)

    for name, module in model.named_modules():
        if name.endswith("attn_probs"):
            owner = name[: -len(".attn_probs")]
            owner_module = model.get_submodule(owner)
            hooks.append(owner_module.register_forward_pre_hook(lambda m, args, owner=owner: remember(owner, args)))
            hooks.append(
                module.register_forward_hook(
                    lambda m, i, o, owner=owner, om=owner_module: records.append(
                        AttentionRecord(owner, o.detach(), om, *inputs.get(owner, (None, None)))
                    )
                )
            )
    if not hooks:
        raise ValueError(f"{type(model).__name__}: no attention layer with an attn_probs hook point")
    try:
        with use_fused_attn(False):
            yield records
    finally:
        for h in hooks:
            h.remove()


def attention_rollout(maps: list[torch.Tensor], residual: bool = True, head_fusion: str = "mean") -> torch.Tensor:
    """Roll attention out through the layers: ``R = A_L ... A_1`` with heads fused and the residual added.

    Args:
        maps: per layer ``(B, heads, N, N)`` probabilities, first layer first.
        residual: use ``0.5 * A + 0.5 * I`` (the skip connection) before renormalising rows.
        head_fusion: 'mean', 'max' or 'min' over heads.

    Returns:
        ``(B, N, N)``: row i is how much each input token contributes to output token i.
    """
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    if head_fusion not in fuse:
        raise ValueError(f"attention_rollout: head_fusion must be one of {list(fuse)}, got {head_fusion!r}")
    result = None
    for a in maps:
        a = fuse[head_fusion](a.float())
        if residual:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def patch_centres(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Pixel coordinates (y, x) of patch centres, row-major: ``(gh * gw, 2)``."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return (torch.stack([ys, xs], -1).reshape(-1, 2).float() + 0.5) * patch_size


def mean_attention_distance(
    probs: torch.Tensor, grid: tuple[int, int], patch_size: int, num_prefix_tokens: int = 0
) -> torch.Tensor:
    """Attention-weighted mean distance in pixels between query and key patch centres, per head.

    Prefix tokens (class token) are dropped and each query's attention over patch tokens renormalised; the
    result is averaged over queries and images: ``(heads,)``.
    """
    p = probs[..., num_prefix_tokens:, num_prefix_tokens:].float()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    centres = patch_centres(grid, patch_size).to(p.device)
    dist = torch.cdist(centres, centres)  # (N, N)
    return (p * dist).sum(-1).mean(dim=(0, 2))


def pos_embed_similarity(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Cosine similarity between the position embeddings of every pair of patches: ``(gh, gw, gh, gw)``."""
    pe = pos_embed[0, num_prefix_tokens:].float()
    sim = F.cosine_similarity(pe[:, None], pe[None], dim=-1)
    return sim.reshape(grid[0], grid[1], grid[0], grid[1])
