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


def attention_similarity_matrix(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per head, the cosine similarity between the attention maps of every pair of layers: ``(heads, L, L)``.

    ``maps[l]`` is ``[B, heads, N, M]`` (dimension 1 is the head). Entry ``[h, i, j]`` is the cosine similarity
    of head ``h``'s query rows in layers ``i`` and ``j``, averaged over queries and images; NaN where the two
    layers' maps differ in shape (a stage boundary) or layer ``i`` has fewer heads.
    """
    heads = max(m.shape[1] for m in maps)
    out = torch.full((heads, len(maps), len(maps)), float("nan"))
    for i, a in enumerate(maps):
        for j, b in enumerate(maps):
            if a.shape == b.shape:
                sim = F.cosine_similarity(a.float(), b.float(), dim=-1)  # (B, heads, N)
                out[: a.shape[1], i, j] = sim.transpose(0, 1).reshape(a.shape[1], -1).mean(1).cpu()
    return out
