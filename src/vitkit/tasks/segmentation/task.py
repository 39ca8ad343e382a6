"""Semantic segmentation: a class per pixel, cross-entropy with an ignore index, mIoU.

Models (:mod:`vitkit.tasks.segmentation.models`) return logits at their head's output stride, as transformers'
and cvnets' DeepLabv3 do; the loss, the metrics and prediction upsample them bilinearly to the mask or input
size first (:func:`~vitkit.tasks.segmentation.metrics.upsample_logits`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vitkit.config import value_range
from vitkit.tasks.base import EvalContext, Task
from vitkit.tasks.classification.metrics import plot_confusion
from vitkit.tasks.segmentation.data import (
    IGNORE,
    SEG_DATASETS,
    SegEvalTransform,
    SegTrainTransform,
    build_seg_dataset,
    voc_palette,
)
from vitkit.tasks.segmentation.metrics import SegmentationCounter, upsample_logits


class SegmentationTask(Task):
    name = "segmentation"
    score = "miou"
    score_label = "mIoU"
    metrics = ("miou", "pixel_acc", "loss")
    datasets = tuple(SEG_DATASETS)

    @dataclass(frozen=True)
    class Options:
        scale_min: float = field(default=0.5, metadata=value_range(0, lo_open=True))  # random scale range
        scale_max: float = field(default=2.0, metadata=value_range(0, lo_open=True))
        photometric: bool = True  # brightness / contrast / saturation / hue distortion in training
        ignore_index: int = field(default=IGNORE, metadata=value_range(0, 255))

    def dataset(self, split: str, download: bool = False):
        d = self.cfg.data
        return build_seg_dataset(d.dataset.lower(), d.root, split)

    def resolve(self, dataset) -> None:
        super().resolve(dataset)
        self.resolve_classes(dataset)

    def train_transform(self, data_config: dict):
        o = self.options
        return SegTrainTransform(data_config, (o.scale_min, o.scale_max), self.cfg.aug.hflip, o.photometric)

    def eval_transform(self, data_config: dict):
        return SegEvalTransform(data_config)

    def losses(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = upsample_logits(model(inputs), tuple(targets.shape[-2:]))
        return {"ce": F.cross_entropy(logits.float(), targets, ignore_index=self.options.ignore_index)}

    def example_targets(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(inputs.shape[0], *inputs.shape[-2:], dtype=torch.long)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, ctx: EvalContext) -> dict:
        counter, tally = SegmentationCounter(self.cfg.model.num_classes, self.options.ignore_index), {}
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
            f"mIoU {results['miou']:.4f}  pixel acc {results['pixel_acc']:.4f}  loss {results['loss']:.4f}  "
            f"({results['images']} images, {results['failed_images']} skipped)"
        ]
        for name, iou in zip(self.classes, results["per_class_iou"]):
            lines.append(f"  {name:<20} IoU {'-' if iou is None else f'{iou:.4f}'}")
        return "\n".join(lines)

    @torch.no_grad()
    def predict_batch(self, model: nn.Module, inputs: torch.Tensor, metas: list) -> list[dict]:
        labels = upsample_logits(model(inputs), tuple(inputs.shape[-2:])).argmax(1).to(torch.uint8).cpu().numpy()
        out = []
        for lab in labels:
            counts = np.bincount(lab.ravel(), minlength=len(self.classes))
            fractions = {self.classes[c]: round(float(n) / lab.size, 4) for c, n in enumerate(counts) if n}
            out.append({"classes": fractions, "_labels": lab})
        return out

    def format_prediction(self, result: dict) -> str:
        top = sorted(result["classes"].items(), key=lambda kv: -kv[1])
        return ", ".join(f"{name} {frac:.1%}" for name, frac in top)

    def save_predictions(self, results: list[dict], folder: Path) -> list[Path]:
        """Per image: ``<stem>_labels.png`` (the label map at the image's size, palette PNG) and
        ``<stem>_overlay.png`` (class colours blended over the image), then ``predictions.json``."""
        folder.mkdir(parents=True, exist_ok=True)
        palette, files = voc_palette(), []
        for r in results:
            src = Image.open(r["image"]).convert("RGB")
            lab = Image.fromarray(r["_labels"], mode="P").resize(src.size, Image.NEAREST)
            lab.putpalette(palette)
            stem = Path(r["image"]).stem
            lab.save(folder / f"{stem}_labels.png")
            colours = lab.convert("RGB")
            alpha = Image.fromarray(((np.asarray(lab) > 0) * 128).astype(np.uint8))  # class 0 (background) clear
            Image.composite(Image.blend(src, colours, 0.6), src, alpha).save(folder / f"{stem}_overlay.png")
            files += [folder / f"{stem}_labels.png", folder / f"{stem}_overlay.png"]
            r["labels_png"], r["overlay_png"] = str(files[-2]), str(files[-1])
        public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        return files + super().save_predictions(public, folder)
