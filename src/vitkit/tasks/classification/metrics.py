"""Classification metrics: top-1/top-5, loss, per-class accuracy and the confusion matrix (summed over ranks).

The counting is a confusion matrix in float64 (exact for any realistic image count), so the numbers are the
same on any number of DDP ranks; the figure is matplotlib's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitkit.runtime import DistInfo, all_reduce_sum


class ConfusionCounter:
    """Running counts for one evaluation pass: the confusion matrix (rows: true class), top-5 hits, summed loss.

    Counts are float64 and summed over DDP ranks by :meth:`result`, so every rank returns the global numbers.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.top5 = torch.zeros((), dtype=torch.float64)
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.failed = 0

    def update(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        n = self.num_classes
        logits = logits.float()
        self.loss_sum += F.cross_entropy(logits, y, reduction="sum").double().cpu()
        pred = logits.argmax(1)
        self.top5 += (logits.topk(min(5, n), dim=1).indices == y[:, None]).any(1).sum().double().cpu()
        self.confusion += torch.bincount((y * n + pred).cpu(), minlength=n * n).reshape(n, n)

    def result(self, dist: DistInfo) -> dict:
        n = self.num_classes
        stats = torch.cat([self.confusion.flatten(), self.top5[None], self.loss_sum[None], torch.tensor([self.failed])])
        stats = all_reduce_sum(stats.double(), dist)
        confusion = stats[: n * n].reshape(n, n)
        top5, loss_sum, failed = stats[-3].item(), stats[-2].item(), int(stats[-1].item())
        count = confusion.sum().item()
        return {
            "top1": confusion.diag().sum().item() / max(count, 1),
            "top5": top5 / max(count, 1),
            "loss": loss_sum / max(count, 1),
            "images": int(count),
            "failed_images": failed,
            "per_class": (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist(),
            "confusion": confusion.long().tolist(),
        }


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str = "") -> Path | None:
    """Row-normalised confusion matrix as a PNG (rows: true class, columns: prediction)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cm = np.asarray(confusion, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    size = min(12, 2 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        int(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
