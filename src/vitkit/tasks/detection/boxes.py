"""Box operations for detection, in plain torch (no torchvision): IoU, GIoU, the box coder, NMS.

Boxes are ``(x0, y0, x1, y1)`` in input pixels (continuous coordinates: a box covering pixel columns 3..5 is
``x0=3, x1=6``). kornia has no batched NMS with torchvision's semantics, so NMS is written here: greedy, highest
score first, suppressing every box whose IoU with a kept box exceeds the threshold (``>``, as torchvision's).
"""

from __future__ import annotations

import math

import torch


def box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def _inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, box_area(a)[:, None] + box_area(b)[None, :] - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N, M)`` IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4); 0 where the union is empty."""
    inter, union = _inter_union(a, b)
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N, M)`` GIoU (Rezatofighi et al. 2019): IoU minus the enclosing box's share not covered by the union."""
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp(min=1e-12)
    lt = torch.minimum(a[:, None, :2], b[None, :, :2])
    rb = torch.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclose = wh[..., 0] * wh[..., 1]
    return iou - (enclose - union) / enclose.clamp(min=1e-12)


class BoxCoder:
    """Boxes as deltas from anchors: ``((cx - ax) / aw / s0, (cy - ay) / ah / s1, log(w / aw) / s2, log(h / ah) / s3)``.

    ``stds`` (1, 1, 1, 1) is RetinaNet's (mmdetection's ``DeltaXYWHBBoxCoder`` defaults); (0.1, 0.1, 0.2, 0.2) is
    SSD's centre/size variance. Decoded log-sizes are clamped at ``log(1000 / 16)``, as torchvision and mmdetection
    do, so a wild prediction cannot overflow.
    """

    def __init__(self, stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)):
        self.stds = stds
        self.clamp = math.log(1000.0 / 16)

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
        ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        x, y = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
        s = self.stds
        dx, dy = (x - ax) / aw / s[0], (y - ay) / ah / s[1]
        return torch.stack([dx, dy, torch.log(w / aw) / s[2], torch.log(h / ah) / s[3]], 1)

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
        ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
        s = self.stds
        x, y = ax + deltas[:, 0] * s[0] * aw, ay + deltas[:, 1] * s[1] * ah
        w = aw * torch.exp((deltas[:, 2] * s[2]).clamp(max=self.clamp))
        h = ah * torch.exp((deltas[:, 3] * s[3]).clamp(max=self.clamp))
        return torch.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], 1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy NMS, highest score first.

    One step per *kept* box: take the best remaining box, drop every remaining box overlapping it above the
    threshold (no N x N matrix, so thousands of low-score candidates of an untrained model stay cheap). Boxes on
    an accelerator are suppressed on the CPU: the loop reads one index per kept box, and on a GPU each read is a
    device synchronisation (an untrained SSDLite's evaluation took minutes per epoch on an H200 that way).
    """
    if boxes.device.type != "cpu":
        return nms(boxes.float().cpu(), scores.float().cpu(), iou_threshold).to(boxes.device)
    order = scores.argsort(descending=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        order = rest[box_iou(boxes[i][None], boxes[rest])[0] <= iou_threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long, device=boxes.device)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Class-wise NMS: boxes of different labels never suppress each other (each class is shifted apart)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offset = labels.to(boxes) * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset[:, None], scores, iou_threshold)


def clip_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Clip to an image of ``size = (H, W)``."""
    h, w = size
    return torch.stack(
        [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1
    )
