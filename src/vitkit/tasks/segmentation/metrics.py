"""Segmentation metrics from a pixel confusion matrix: mIoU, pixel accuracy, per-class IoU and accuracy.

Pixels labelled with the ignore index count nowhere. The matrix is int64 per batch and float64 in total (exact
for any realistic pixel count) and summed over DDP ranks, so every rank returns the global numbers. mIoU is the
mean IoU over the classes that occur in the ground truth or the predictions (a class absent from both has no IoU
and is left out, as mmsegmentation and torchmetrics' ``JaccardIndex(ignore_index=..., average='macro')`` do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitkit.runtime import DistInfo, all_reduce_sum


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits at the head's output stride ``(B, C, h, w)`` -> ``(B, C, H, W)`` at the input or mask size, bilinear
    (``align_corners=False``), as transformers' and cvnets' DeepLabv3 do before the loss and the argmax."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows the true class, over the pixels not ignored."""
    keep = target != ignore_index
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx.flatten(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(cm: torch.Tensor) -> dict:
    """mIoU, pixel accuracy and per-class IoU / accuracy (None where a class has no pixels) from a confusion."""
    cm = cm.double()
    tp = cm.diag()
    gt, pr = cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.nan)
    present = union > 0
    return {
        "miou": iou[present].mean().item() if present.any() else 0.0,
        "pixel_acc": (tp.sum() / cm.sum().clamp(min=1)).item(),
        "per_class_iou": [None if torch.isnan(v) else v.item() for v in iou],
        "per_class_acc": [None if torch.isnan(v) else v.item() for v in acc],
    }


class SegmentationCounter:
    """Running pixel confusion, summed loss and counts for one evaluation pass."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.loss_sum = 0.0
        self.images = self.failed = 0

    def update(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        logits = upsample_logits(logits, tuple(masks.shape[-2:]))
        loss = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index, reduction="sum")
        self.loss_sum += loss.item()
        self.cm += confusion(logits.argmax(1), masks, self.num_classes, self.ignore_index).cpu().double()
        self.images += len(masks)

    def result(self, dist: DistInfo) -> dict:
        n = self.num_classes
        extra = torch.tensor([self.loss_sum, self.images, self.failed], dtype=torch.float64)
        stats = all_reduce_sum(torch.cat([self.cm.flatten(), extra]), dist)
        cm = stats[: n * n].reshape(n, n)
        pixels = cm.sum().item()
        out = scores(cm)
        out.update(
            loss=stats[-3].item() / max(pixels, 1),
            images=int(stats[-2].item()),
            failed_images=int(stats[-1].item()),
            pixels=int(pixels),
            confusion=cm.long().tolist(),
        )
        return out
