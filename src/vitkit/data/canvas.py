"""Dense-prediction data built from real MNIST digits: canvases with several digits, their boxes and masks.

``vitkit data mnist-segmentation OUT`` and ``vitkit data mnist-detection OUT`` write offline datasets in the
standard layouts (VOC-style segmentation, COCO detection) from the real MNIST digits, so the segmentation and
detection tasks train and evaluate on real handwriting with no download.

Each canvas (default 128x128, black) holds 1-5 digits, each resized to a side drawn from ``scale`` (pixels) and
pasted at a random place where its box overlaps no earlier digit's box by more than ``max_iou``; overlapping
strokes take the brighter pixel. A digit's *stroke pixels* are those at half intensity or more (>= 128 of 255)
after resizing; its ground-truth box is the tight box around them, its mask those pixels (the later digit wins
where two strokes overlap). Everything is a function of ``seed``: the same call writes the same files. The
train and held-out canvases draw from disjoint digit images (by default the first 8,000 and the last 2,000 of
the 10,000-digit MNIST test split).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

STROKE = 128  # a stroke pixel is at least half intensity


@dataclass
class Canvas:
    """One canvas: ``image`` (H, W) uint8, per digit ``labels``, ``boxes`` (x0, y0, x1, y1; exclusive ends) and
    ``sources`` (the digit's index in the pool), and ``mask`` (H, W) int64 with the digit's label + 1 on its stroke
    pixels and 0 elsewhere."""

    image: np.ndarray
    labels: list[int]
    boxes: list[tuple[int, int, int, int]]
    mask: np.ndarray
    sources: list[int]


def box_iou(a: tuple, b: tuple) -> float:
    """IoU of two (x0, y0, x1, y1) boxes with exclusive ends."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_canvas(
    digits: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    size: int = 128,
    count: tuple[int, int] = (1, 5),
    scale: tuple[int, int] = (20, 56),
    max_iou: float = 0.0,
    tries: int = 50,
) -> Canvas:
    """One canvas from a pool of ``digits`` (N, 28, 28) uint8 with their ``labels``."""
    canvas = np.zeros((size, size), np.uint8)
    mask = np.zeros((size, size), np.int64)
    out_labels, boxes, sources = [], [], []
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        for _ in range(tries):
            i = int(rng.integers(len(digits)))
            side = int(rng.integers(scale[0], scale[1] + 1))
            glyph = np.asarray(Image.fromarray(digits[i]).resize((side, side), Image.BILINEAR))
            ys, xs = np.nonzero(glyph >= STROKE)
            if len(ys) == 0:
                continue
            y0, x0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
            if any(box_iou(box, b) > max_iou for b in boxes):
                continue
            region = canvas[y0 : y0 + side, x0 : x0 + side]
            np.maximum(region, glyph, out=region)
            mask[y0 : y0 + side, x0 : x0 + side][glyph >= STROKE] = int(labels[i]) + 1
            out_labels.append(int(labels[i]))
            boxes.append(box)
            sources.append(i)
            break
    return Canvas(canvas, out_labels, boxes, mask, sources)


def make_canvases(digits: np.ndarray, labels: np.ndarray, n: int, seed: int, **kwargs) -> list[Canvas]:
    """``n`` canvases, canvas ``k`` drawn with a generator seeded from ``(seed, k)`` (the same for any ``n``)."""
    return [make_canvas(digits, labels, np.random.default_rng([seed, k]), **kwargs) for k in range(n)]
