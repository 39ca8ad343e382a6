"""Attention similarity across layers (attention saturation / collapse; DeepViT, LaViT).

Two ways to compare layer p's attention with layer q's, per head (``axis``):

* ``'row'``: each query's attention over the keys (a row of ``A``), cosine similarity between the layers, averaged
  over queries and images;
* ``'column'``: the DeepViT paper's cross-layer similarity (Zhou et al. 2021, arXiv 2103.11886, eq. for
  ``M^{p,q}_{h,t}``): for head h and token t, the cosine similarity of the column ``A_{h,:,t}`` (how every query
  attends to token t) in the two layers, averaged over tokens and images.

Both take the maps as the layers apply them to their values (what :func:`vitkit.interpret.capture_attention`
records): softmax probabilities for plain attention, the mixed and normalised maps for re-attention. Maps of
different shapes (a stage boundary, or spatially reduced keys of another size) are not compared (NaN). Windowed
attention (Swin, HaloNet, NesT) is compared window by window: the windows of two layers of a stage hold the same
tokens only when the layers partition the map alike (a shifted-window layer against an unshifted one compares
windows over different tokens).

:func:`attention_collapse` runs any model whose attention can be captured over a batch of images and returns the
matrix with the layer where adjacent-layer similarity saturates; :func:`plot_attention_collapse` draws it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_AXES = {"row": -1, "column": -2}


def _dim(axis: str) -> int:
    if axis not in _AXES:
        raise ValueError(f"attention similarity: axis must be one of {tuple(_AXES)}, got {axis!r}")
    return _AXES[axis]


def _cosine(a: torch.Tensor, b: torch.Tensor, dim: int, center: bool) -> torch.Tensor:
    a, b = a.float(), b.float()
    if center:  # Pearson correlation: blind to a constant added along the compared axis (a norm's shift)
        a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
    return F.cosine_similarity(a, b, dim=dim)


def attention_similarity(maps: list[torch.Tensor], axis: str = "row", center: bool = False) -> list[float]:
    """Mean cosine similarity between the attention maps of consecutive layers.

    Args:
        maps: per layer ``[B, heads, N, M]`` attention maps, in layer order. Pairs whose shapes differ
            (a stage boundary) are skipped.
        axis: 'row' (each query's attention over keys) or 'column' (each key's attention from all queries:
            DeepViT's definition).
        center: subtract each row's (column's) mean first, so the similarity is a correlation (see
            :func:`attention_similarity_matrix`).

    Returns:
        One value per consecutive same-shape pair, averaged over rows (or columns), heads and images
        (1.0 means the later layer attends exactly like the earlier).
    """
    dim = _dim(axis)
    return [_cosine(a, b, dim, center).mean().item() for a, b in zip(maps, maps[1:]) if a.shape == b.shape]


def attention_similarity_matrix(maps: list[torch.Tensor], axis: str = "row", center: bool = False) -> torch.Tensor:
    """Per head, the cosine similarity between the attention maps of every pair of layers: ``(heads, L, L)``.

    ``maps[l]`` is ``[B, heads, N, M]`` (dimension 1 is the head). Entry ``[h, i, j]`` is the cosine similarity
    of head ``h``'s rows (``axis='row'``: each query's attention) or columns (``axis='column'``: each key's
    attention from every query, DeepViT's ``M^{i,j}_{h,t}``) in layers ``i`` and ``j``, averaged over them and
    over images; NaN where the two layers' maps differ in shape (a stage boundary) or layer ``i`` has fewer heads.

    ``center=True`` subtracts each row's (column's) mean before the cosine (a Pearson correlation). Re-attention's
    BatchNorm shifts every entry of a head's map by a constant, which the plain cosine counts as (dis)similarity;
    the centred one does not, so it compares re-attended and softmax maps on an equal footing. A uniform row or
    column centres to zero and counts as similarity 0.
    """
    dim = _dim(axis)
    heads = max(m.shape[1] for m in maps)
    out = torch.full((heads, len(maps), len(maps)), float("nan"))
    for i, a in enumerate(maps):
        for j, b in enumerate(maps):
            if a.shape == b.shape:
                sim = _cosine(a, b, dim, center)  # (B, heads, N or M)
                out[: a.shape[1], i, j] = sim.transpose(0, 1).reshape(a.shape[1], -1).mean(1).cpu()
    return out


@dataclass
class CollapseResult:
    """Cross-layer attention similarity of one model on a set of images (see :func:`attention_collapse`)."""

    layers: list[str]  # the attention modules, in call order
    matrix: torch.Tensor  # (heads, L, L): per-head similarity, mean over images (NaN: not comparable)
    axis: str
    center: bool
    threshold: float
    images: int
    adjacent: torch.Tensor = field(init=False)  # (L - 1,): mean over heads of similarity(layer l, layer l + 1)
    saturated_from: int | None = field(init=False)  # first layer l from which every later adjacent pair >= threshold

    def __post_init__(self) -> None:
        mean = self.matrix.nanmean(0)
        self.adjacent = mean.diagonal(1).clone()  # [l] = sim(l, l + 1)
        self.saturated_from = saturation_layer(self.adjacent, self.threshold)

    @property
    def similar_pairs(self) -> int:
        """How many adjacent layer pairs are at least ``threshold`` similar (DeepViT's "similar blocks")."""
        return int((self.adjacent >= self.threshold).sum())

    def as_dict(self) -> dict:
        return dict(
            layers=self.layers,
            axis=self.axis,
            center=self.center,
            threshold=self.threshold,
            images=self.images,
            adjacent=[None if math.isnan(v) else round(v, 5) for v in self.adjacent.tolist()],
            saturated_from=self.saturated_from,
            similar_pairs=self.similar_pairs,
            matrix_mean_over_heads=[
                [None if math.isnan(v) else round(v, 4) for v in row] for row in self.matrix.nanmean(0).tolist()
            ],
        )


def saturation_layer(adjacent: torch.Tensor, threshold: float) -> int | None:
    """The first layer ``l`` with ``adjacent[k] >= threshold`` for every ``k >= l`` (the similarity of layer k
    and k + 1): from layer ``l`` on, attention maps no longer change (saturated). None when the last pair is below
    the threshold or not comparable. NaN pairs (a stage boundary) break a run."""
    ok = (adjacent >= threshold).tolist()  # NaN compares False
    if not ok or not ok[-1]:
        return None
    first = len(ok) - 1
    while first > 0 and ok[first - 1]:
        first -= 1
    return first


def attention_collapse(
    model: nn.Module,
    images: torch.Tensor,
    axis: str = "column",
    center: bool = False,
    threshold: float = 0.9,
    batch_size: int = 64,
) -> CollapseResult:
    """Cross-layer attention similarity of ``model`` over ``images`` (any model :func:`capture_attention` works on).

    Args:
        images: ``(B, C, H, W)``, preprocessed as the model expects.
        axis: 'column' (DeepViT's definition, the default) or 'row' (see the module docstring).
        center: correlate instead of the plain cosine (see :func:`attention_similarity_matrix`).
        threshold: similarity from which two adjacent layers count as alike; DeepViT's analysis uses high values
            (its figure marks layers more than 90% alike), hence 0.9.
        batch_size: images per forward; the matrix is the mean over all images either way.
    """
    from vitkit.interpret.attention import capture_attention  # attention imports nothing from here; lazy anyway

    _dim(axis)
    was_training = model.training
    model.eval()
    total, layers, n = None, [], 0
    try:
        for chunk in images.split(batch_size):
            with torch.no_grad(), capture_attention(model) as records:
                model(chunk)
            sim = attention_similarity_matrix([r.probs for r in records], axis, center) * len(chunk)
            total = sim if total is None else total + sim
            layers, n = [r.layer for r in records], n + len(chunk)
    finally:
        model.train(was_training)
    return CollapseResult(layers, total / n, axis, center, threshold, n)


def plot_attention_collapse(results: dict[str, CollapseResult], path: str | Path, title: str = "") -> Path:
    """One PNG: adjacent-layer similarity per model (saturation marked) and each model's mean matrix."""
    from vitkit.interpret.explain import _plt, _save

    plt = _plt()
    n = len(results)
    fig, axes = plt.subplots(1, n + 1, figsize=(5 + 3.2 * n, 3.8), squeeze=False)
    ax = axes[0][0]
    for label, r in results.items():
        (line,) = ax.plot(range(len(r.adjacent)), r.adjacent.numpy(), marker=".", lw=1.2, label=label)
        if r.saturated_from is not None:
            ax.axvline(r.saturated_from, color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("layer l (0-based): similarity of layers l and l + 1")
    first = next(iter(results.values()))
    ax.axhline(first.threshold, color="grey", lw=0.8, ls="--")
    ax.set_ylabel(f"{'correlation' if first.center else 'cosine similarity'} ({first.axis}s)")
    ax.set_ylim(min(0.0, min(float(r.adjacent.nan_to_num(1).min()) for r in results.values())), 1.02)
    ax.legend(fontsize=7)
    ax.set_title(title or "adjacent-layer attention similarity (dotted: saturated from)", fontsize=8)
    for k, (label, r) in enumerate(results.items()):
        mean = r.matrix.nanmean(0)
        low = min(0.0, float(mean.nan_to_num(1).min()))
        im = axes[0][k + 1].imshow(mean.numpy(), vmin=low, vmax=1, cmap="viridis")
        axes[0][k + 1].set_title(f"{label}: layer x layer", fontsize=8)
        axes[0][k + 1].set_xlabel("layer")
    fig.colorbar(im, ax=axes[0][-1], fraction=0.046)
    path = Path(path)
    _save(fig, path, plt)
    return path
