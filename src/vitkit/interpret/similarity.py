"""Attention similarity across layers (attention saturation / collapse; DeepViT, LaViT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_similarity(maps: list[torch.Tensor]) -> list[float]:
    """Mean cosine similarity between the attention maps of consecutive layers.

    Args:
        maps: per layer ``[B, heads, N, M]`` attention probabilities, in layer order. Pairs whose shapes differ
            (a stage boundary) are skipped.

    Returns:
        One value per consecutive same-shape pair: the cosine similarity of each query's attention row,
        averaged over queries, heads and images (1.0 means the later layer attends exactly like the earlier).
    """
    out = []
    for a, b in zip(maps, maps[1:]):
        if a.shape != b.shape:
            continue
        out.append(F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item())
    return out
