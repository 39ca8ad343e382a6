"""Image classification: one label per image, soft cross-entropy with mixup/cutmix and label smoothing, top-1/top-5.

Datasets are the classification sets of :mod:`vitkit.data.datasets` (digits, MNIST, Fashion-MNIST, CIFAR,
image folders); augmentation is :class:`~vitkit.data.transforms.TrainTransform` per sample and
:func:`~vitkit.data.transforms.mix_batch` per batch; the metrics are a confusion matrix
(:mod:`vitkit.tasks.classification.metrics`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vitkit.data.datasets import DATASETS, build_dataset
from vitkit.data.transforms import EvalTransform, TrainTransform, mix_batch, soft_cross_entropy
from vitkit.tasks.base import EvalContext, Task
from vitkit.tasks.classification.metrics import ConfusionCounter, plot_confusion


class ClassificationTask(Task):
    name = "classification"
    score = "top1"
    score_label = "top-1"
    metrics = ("top1", "top5", "loss")
    datasets = DATASETS

    # ---- data ---------------------------------------------------------------------------------------

    def dataset(self, split: str, download: bool = False):
        d = self.cfg.data
        return build_dataset(d.dataset, d.root, split, download=download)

    def resolve(self, dataset) -> None:
        """Channels (see :meth:`Task.resolve`), then the class names and their count from the dataset."""
        super().resolve(dataset)
        self.resolve_classes(dataset)

    def data_config(self, model: nn.Module) -> dict:
        return dict(super().data_config(model), eval_canvas=self.cfg.aug.crop == "canvas")

    def train_transform(self, data_config: dict):
        a = self.cfg.aug
        c, h, w = data_config["input_size"]
        tf = TrainTransform(
            (h, w),
            data_config["mean"],
            data_config["std"],
            c,
            a.crop,
            tuple(a.scale),
            a.pad,
            a.hflip,
            a.randaugment,
            a.erasing,
            data_config["interpolation"],
        )
        return _ImageOnly(tf)

    def eval_transform(self, data_config: dict):
        return _ImageOnly(EvalTransform.from_data_config(data_config))

    # ---- training -----------------------------------------------------------------------------------

    def prepare(self, inputs: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator):
        """Mixup / cutmix and label smoothing: integer labels become soft targets."""
        a = self.cfg.aug
        num_classes = self.cfg.model.num_classes
        return mix_batch(
            inputs, targets, num_classes, rng, a.mixup, a.cutmix, a.mix_prob, a.switch_prob, a.label_smoothing
        )

    def losses(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ce": soft_cross_entropy(model(inputs), targets)}

    def example_targets(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(inputs.shape[0], dtype=torch.long)

    # ---- evaluation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, ctx: EvalContext) -> dict:
        counter, tally = ConfusionCounter(self.cfg.model.num_classes), {}
        for y, logits in self.forward_eval(model, batches, ctx, tally):
            counter.update(logits, y)
        counter.failed = tally.get("failed", 0)
        return counter.result(ctx.dist)

    def write_eval(self, results: dict, folder: Path, title: str) -> list[Path]:
        files = super().write_eval(dict(results, classes=self.classes), folder, title)
        png = plot_confusion(results["confusion"], self.classes, folder / "confusion.png", title)
        return files + ([png] if png else [])

    def format_eval(self, results: dict) -> str:
        lines = [
            f"top-1 {results['top1']:.4f}  top-5 {results['top5']:.4f}  loss {results['loss']:.4f}  "
            f"({results['images']} images, {results['failed_images']} undecodable)"
        ]
        lines += [f"  {name:<20} {acc:.4f}" for name, acc in zip(self.classes, results["per_class"])]
        return "\n".join(lines)

    # ---- prediction ---------------------------------------------------------------------------------

    @torch.no_grad()
    def predict_batch(self, model: nn.Module, inputs: torch.Tensor, metas: list, topk: int = 5) -> list[dict]:
        classes = self.classes
        probs = model(inputs).float().softmax(-1)
        p, idx = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        return [
            {"top": [{"class": classes[c], "index": c, "prob": q} for q, c in zip(pi, ii)]}
            for pi, ii in zip(p.tolist(), idx.tolist())
        ]

    def format_prediction(self, result: dict) -> str:
        return ", ".join(f"{t['class']} {t['prob']:.3f}" for t in result["top"])


class _ImageOnly:
    """An image transform applied to a ``(image, label)`` sample: the label passes through."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img, target, rng=None, size=None):
        return self.transform(img, rng, size), target
