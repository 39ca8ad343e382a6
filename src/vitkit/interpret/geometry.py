"""Captured attention in image coordinates: where one query pixel looks, per layer and head, as an image.

Each family arranges its queries and keys differently, and the module that knows the arrangement describes
it: :func:`attention_to_image` asks the innermost module on the path from the recorded attention layer up to
the model (the layer itself, the block or level that owns it, or the model) that has a method

    ``attention_geometry(record, query) -> (B, heads, kh, kw)``

for the query token's attention as values on a grid of key cells laid evenly over the image (zeros where it
does not look), and paints it: each image pixel takes its cell's value. ``record`` is the
:class:`~vitkit.interpret.AttentionRecord` (probabilities in fp32); ``query`` an :class:`ImageQuery`, which
locates the query pixel on a grid of cells and lays out token grids whose shape a module does not know. A new
family or task model only implements that method; where no module on the path has one, the layer is read as
token attention over a grid (given by the record, or laid out with the image's aspect ratio), the layout of
plain ViT-style attention without prefix tokens.

The result is ``(B, heads, H, W)`` in probability per key token, so the values of the distinct key cells sum to
the mass that falls inside the image (1 for a row that never sees padding).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from vitkit.interpret.attention import AttentionRecord
from vitkit.layers.attention import token_attention_cells


def _grid_for(n: int, aspect: float) -> tuple[int, int]:
    """A (rows, cols) grid of ``n`` cells whose rows / cols is closest to ``aspect`` (image H / W)."""
    best = None
    for r in range(1, n + 1):
        if n % r == 0:
            err = abs(math.log(r / (n // r)) - math.log(aspect))
            if best is None or err < best[0]:
                best = (err, (r, n // r))
    return best[1]


def _paint(cells: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, heads, gh, gw) values per cell -> (B, heads, H, W): each image pixel takes its cell's value."""
    return F.interpolate(cells, size=size, mode="nearest")


def _query_cell(query: tuple[int, int], size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    py, px = query
    if not (0 <= py < size[0] and 0 <= px < size[1]):
        raise ValueError(f"attention_to_image: query pixel {query} is outside the {size[0]}x{size[1]} image")
    return min(grid[0] - 1, py * grid[0] // size[0]), min(grid[1] - 1, px * grid[1] // size[1])


@dataclasses.dataclass(frozen=True)
class ImageQuery:
    """A query pixel ``(y, x)`` on an image of ``size = (H, W)``, as attention modules see it when they describe
    their geometry (``attention_geometry``)."""

    pixel: tuple[int, int]
    size: tuple[int, int]

    def cell(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The cell ``(row, col)`` holding the query pixel on a ``grid`` of cells laid evenly over the image."""
        return _query_cell(self.pixel, self.size, grid)

    def grid(self, n: int, aspect: float | None = None) -> tuple[int, int]:
        """A ``(rows, cols)`` layout of ``n`` cells closest to ``aspect`` (rows / cols; default the image's)."""
        return _grid_for(n, self.size[0] / self.size[1] if aspect is None else aspect)


def _geometry_owner(model: nn.Module, layer: str) -> nn.Module | None:
    """The innermost module with ``attention_geometry`` on the path from ``layer`` up to ``model``."""
    parts = layer.split(".")
    for i in range(len(parts), -1, -1):
        m = model.get_submodule(".".join(parts[:i]))
        if hasattr(m, "attention_geometry"):
            return m
    return None


def attention_to_image(
    model: nn.Module, record: AttentionRecord, img_size: tuple[int, int], query: tuple[int, int]
) -> torch.Tensor:
    """Attention of the token holding image pixel ``query = (y, x)`` over the image: ``(B, heads, H, W)``.

    ``record`` comes from :func:`vitkit.interpret.capture_attention` on ``model`` with an input of
    ``img_size = (H, W)``.
    """
    size = tuple(img_size)
    record = dataclasses.replace(record, probs=record.probs.float())
    q = ImageQuery(tuple(query), size)
    owner = _geometry_owner(model, record.layer)
    if owner is None:  # plain token attention
        cells = token_attention_cells(record.probs, q, record.grid)
    else:
        cells = owner.attention_geometry(record, q)
    return _paint(cells, size)


def mean_attention_distance_image(
    model: nn.Module, record: AttentionRecord, img_size: tuple[int, int], queries: int = 8
) -> torch.Tensor:
    """Mean attention distance in pixels per head for any family: ``(heads,)``.

    For a ``queries x queries`` grid of query pixels, the attention painted on the image
    (:func:`attention_to_image`) weights the distance from the query pixel to every image pixel; the weighted
    mean (normalised by the painted mass) is averaged over queries and images. Each key token counts with the
    mean distance over the pixels it covers, so a query attending only to its own token scores about 0.4 of
    the token's side, not 0 (the ViT-token version, :func:`mean_attention_distance`, uses token centres).
    """
    H, W = img_size
    yy = torch.arange(H, dtype=torch.float32)[:, None] + 0.5
    xx = torch.arange(W, dtype=torch.float32)[None, :] + 0.5
    total = None
    for qy in ((torch.arange(queries) + 0.5) * H / queries).long().tolist():
        for qx in ((torch.arange(queries) + 0.5) * W / queries).long().tolist():
            heat = attention_to_image(model, record, img_size, (qy, qx)).cpu()
            dist = torch.sqrt((yy - qy - 0.5) ** 2 + (xx - qx - 0.5) ** 2)
            d = ((heat * dist).sum((-2, -1)) / heat.sum((-2, -1)).clamp_min(1e-12)).mean(0)
            total = d if total is None else total + d
    return total / queries**2
