"""Object detection: boxes and classes per image; the detector computes its own losses; COCO mAP by pycocotools.

The model contract is torchvision's (:mod:`vitkit.tasks.detection.models`): ``model(images, targets)`` returns
named losses in training, ``model(images)`` per-image boxes / scores / labels in eval mode. Boxes in the input
are mapped back to original image pixels with the transform's scale for evaluation and prediction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn

from vitkit.runtime import gather_objects
from vitkit.tasks.base import EvalContext, Task
from vitkit.tasks.detection.data import CocoDetection, DetTransform, build_det_dataset, det_collate
from vitkit.tasks.detection.metrics import coco_evaluate, to_coco_results

COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]  # fmt: skip


def _coco_source(dataset) -> tuple[CocoDetection, set[int] | None]:
    """The COCO dataset behind ``dataset`` (a split of it, possibly) and the image ids it covers (None: all)."""
    if isinstance(dataset, CocoDetection):
        return dataset, None
    base = dataset.dataset
    return base, {base.images[i]["id"] for i in dataset.indices}


class DetectionTask(Task):
    name = "detection"
    score = "map"
    score_label = "mAP"
    metrics = ("map", "map50", "map75")
    datasets = ("coco",)

    @dataclass(frozen=True)
    class Options:
        iou_crop: bool = True  # SSD's random IoU crop in training
        photometric: bool = True  # brightness / contrast / saturation / hue distortion in training

    def dataset(self, split: str, download: bool = False):
        d = self.cfg.data
        return build_det_dataset(d.dataset.lower(), d.root, split)

    def resolve(self, dataset) -> None:
        super().resolve(dataset)
        self.resolve_classes(dataset, "categories")

    def train_transform(self, data_config: dict):
        o = self.options
        return DetTransform(data_config, True, self.cfg.aug.hflip, o.iou_crop, o.photometric)

    def eval_transform(self, data_config: dict):
        return DetTransform(data_config, False)

    collate = staticmethod(det_collate)

    def losses(self, model: nn.Module, inputs: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        return model(inputs, targets)

    def example_targets(self, inputs: torch.Tensor) -> list[dict]:
        h, w = inputs.shape[-2:]
        box = torch.tensor([[w * 0.25, h * 0.25, w * 0.75, h * 0.75]])
        return [{"boxes": box, "labels": torch.zeros(1, dtype=torch.long)} for _ in range(len(inputs))]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, ctx: EvalContext) -> dict:
        source, ids = _coco_source(ctx.dataset)
        results, images, tally = [], 0, {}
        for targets, preds in self.forward_eval(model, batches, ctx, tally):
            for p, t in zip(preds, targets):
                results += to_coco_results(p, t["image_id"], t["scale"], source.coco_ids)
            images += len(targets)
        parts = gather_objects((results, images, tally.get("failed", 0)), ctx.dist)
        results = [r for part in parts for r in part[0]]
        gt = dict(source.coco_gt)
        kept = {im["id"] for im in source.images} if ids is None else ids
        gt["images"] = [im for im in gt["images"] if im["id"] in kept]
        gt["annotations"] = [a for a in gt["annotations"] if a.get("image_id") in kept and a.get("id") in source.kept]
        out = coco_evaluate(gt, results, self.classes)
        out.update(images=sum(p[1] for p in parts), failed_images=sum(p[2] for p in parts), detections=len(results))
        return out

    def format_eval(self, results: dict) -> str:
        lines = [
            f"mAP@[.5:.95] {results['map']:.4f}  AP50 {results['map50']:.4f}  AP75 {results['map75']:.4f}  "
            f"AP S/M/L {results['map_small']:.4f}/{results['map_medium']:.4f}/{results['map_large']:.4f}  "
            f"AR@100 {results['mar100']:.4f}  ({results['images']} images, {results['failed_images']} skipped)"
        ]
        for name, ap in zip(self.classes, results["per_class_ap"]):
            lines.append(f"  {name:<20} AP {'-' if ap is None else f'{ap:.4f}'}")
        return "\n".join(lines)

    @torch.no_grad()
    def predict_batch(self, model: nn.Module, inputs: torch.Tensor, metas: list, score: float = 0.3) -> list[dict]:
        out = []
        for p, meta in zip(model(inputs), metas):
            keep = p["scores"] >= score
            boxes = (p["boxes"][keep] / meta["scale"]).tolist()
            dets = [{"label": self.classes[c], "score": round(s, 4), "box": [round(v, 1) for v in b]}
                    for b, s, c in zip(boxes, p["scores"][keep].tolist(), p["labels"][keep].tolist())]  # fmt: skip
            out.append({"detections": dets})
        return out

    def format_prediction(self, result: dict) -> str:
        dets = result["detections"]
        return f"{len(dets)} detection(s)" + "".join(
            f"; {d['label']} {d['score']:.2f} at {[round(v) for v in d['box']]}" for d in dets
        )

    def save_predictions(self, results: list[dict], folder: Path) -> list[Path]:
        """Each image with its boxes drawn and labelled (``<stem>_boxes.png``), then ``predictions.json``."""
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for r in results:
            img = Image.open(r["image"]).convert("RGB")
            draw = ImageDraw.Draw(img)
            for d in r["detections"]:
                colour = COLOURS[self.classes.index(d["label"]) % len(COLOURS)]
                draw.rectangle(d["box"], outline=colour, width=max(1, img.width // 200))
                draw.text((d["box"][0] + 2, d["box"][1] + 1), f"{d['label']} {d['score']:.2f}", fill=colour)
            path = folder / f"{Path(r['image']).stem}_boxes.png"
            img.save(path)
            r["drawn"] = str(path)
            files.append(path)
        return files + super().save_predictions(results, folder)
