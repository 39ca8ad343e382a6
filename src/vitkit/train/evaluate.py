"""Held-out evaluation: top-1/top-5, loss, per-class accuracy and the confusion matrix (summed over ranks)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vitkit.data.loader import collate_skip
from vitkit.train.distributed import DistInfo, all_reduce_sum


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"train.amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; on CPU use bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    view,
    plan: list,
    num_classes: int,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
    dist: DistInfo | None = None,
    num_workers: int = 0,
) -> dict:
    """Run ``model`` over the batches of ``plan`` and return metrics (every rank gets the global numbers)."""
    dist = dist or DistInfo()
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    top5 = torch.zeros((), dtype=torch.float64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    failed = 0
    # a private generator: evaluating must not draw from the global RNG (a resumed run would diverge)
    loader = DataLoader(
        view, batch_sampler=plan, collate_fn=collate_skip, num_workers=num_workers, generator=torch.Generator()
    )
    for x, y, bad in loader:
        failed += len(bad)
        if x is None:
            continue
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double().cpu()
        pred = logits.argmax(1)
        k = min(5, num_classes)
        top5 += (logits.topk(k, dim=1).indices == y[:, None]).any(1).sum().double().cpu()
        idx = (y * num_classes + pred).cpu()
        confusion += torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    stats = torch.cat([confusion.flatten(), top5[None], loss_sum[None], torch.tensor([float(failed)])])
    stats = all_reduce_sum(stats, dist)
    confusion = stats[: num_classes * num_classes].reshape(num_classes, num_classes)
    top5, loss_sum, failed = stats[-3].item(), stats[-2].item(), int(stats[-1].item())
    n = confusion.sum().item()
    model.train(was_training)
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    return {
        "top1": confusion.diag().sum().item() / max(n, 1),
        "top5": top5 / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "images": int(n),
        "failed_images": failed,
        "per_class": per_class,
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
