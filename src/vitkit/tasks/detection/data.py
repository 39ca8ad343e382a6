"""Detection data: COCO-format datasets with their annotations checked, box-aware transforms, MNIST canvases.

A ``coco`` dataset is ``root/annotations/instances_<split>.json`` plus the images it names, looked up under
``root/<split>/``, ``root/images/<split>/`` or ``root/``. The file is parsed once; a file that is not valid JSON or
lacks ``images`` / ``annotations`` / ``categories`` is an error naming it. Every annotation is then checked and a
bad one is counted by reason and dropped, never silently used: a box with negative or zero width or height, a box
reaching outside its image, a ``category_id`` missing from ``categories``, an ``image_id`` missing from
``images``; images whose file is missing are dropped with their annotations. The counts, with a few examples,
are in ``dataset.report`` and printed when the dataset is built. Crowd annotations (``iscrowd=1``) are kept for
evaluation only.

Labels are contiguous indices 0..K-1 over the categories sorted by id; ``coco_ids`` maps them back.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vitkit.data.canvas import make_canvases
from vitkit.data.datasets import parse_split, split_bound
from vitkit.data.images import Split, load_image
from vitkit.data.loader import Failed
from vitkit.data.transforms import interpolation, photometric, to_tensor


class CocoDetection(Dataset):
    """``(PIL image, {"boxes": (N, 4) float xyxy, "labels": (N,) int64, "image_id": int})`` per image."""

    channels = None  # each file is converted to the model's channels

    def __init__(self, root: str | Path, split: str = "train", verbose: bool = True):
        root = Path(root)
        ann_file = root / "annotations" / f"instances_{split}.json"
        if not ann_file.is_file():
            raise FileNotFoundError(f"COCO: annotation file {str(ann_file)!r} not found")
        try:
            data = json.loads(ann_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"COCO: {str(ann_file)!r} is not valid JSON: {e}") from None
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
        if missing:
            raise ValueError(f"COCO: {str(ann_file)!r} has no {', '.join(missing)} list(s)")
        self.ann_file, self.root = ann_file, root
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.coco_ids = [c["id"] for c in cats]
        self.classes = [str(c.get("name", c["id"])) for c in cats]
        label_of = {cid: i for i, cid in enumerate(self.coco_ids)}
        folders = [root / split, root / "images" / split, root]
        images, problems, examples, self.kept = {}, Counter(), {}, set()  # kept: ids of the annotations used
        known_ids = {im["id"] for im in data["images"]}

        def bad(reason: str, what: str) -> None:
            problems[reason] += 1
            if len(examples.setdefault(reason, [])) < 3:
                examples[reason].append(what)

        for im in data["images"]:
            path = next((f / im["file_name"] for f in folders if (f / im["file_name"]).is_file()), None)
            if path is None:
                bad("image file missing", str(im.get("file_name")))
                continue
            images[im["id"]] = dict(im, path=path, boxes=[], labels=[], crowd=[])
        for a in data["annotations"]:
            what = f"annotation {a.get('id')} of image {a.get('image_id')}"
            im = images.get(a.get("image_id"))
            if a.get("image_id") not in known_ids:
                bad("image_id not in images", what)
                continue
            if im is None:
                continue  # its image file is missing: already counted
            x, y, w, h = (float(v) for v in a.get("bbox", (0, 0, -1, -1)))
            if w < 0 or h < 0:
                bad("negative box size", what)
            elif w == 0 or h == 0:
                bad("zero-area box", what)
            elif x < 0 or y < 0 or x + w > im["width"] + 1e-3 or y + h > im["height"] + 1e-3:
                bad("box outside the image", what)
            elif a.get("category_id") not in label_of:
                bad("category_id not in categories", what)
            else:
                self.kept.add(a.get("id"))
                im["crowd" if a.get("iscrowd") else "boxes"].append([x, y, x + w, y + h])
                if not a.get("iscrowd"):
                    im["labels"].append(label_of[a["category_id"]])
        self.images = sorted(images.values(), key=lambda im: im["id"])
        self.report = {"file": str(ann_file), "images": len(self.images), "dropped": dict(problems),
                       "examples": examples}  # fmt: skip
        self.coco_gt = {**{k: data[k] for k in ("images", "categories")}, "annotations": data["annotations"]}
        if problems and verbose:
            parts = "; ".join(f"{n} {r} (e.g. {', '.join(examples[r])})" for r, n in problems.items())
            print(f"COCO {ann_file}: dropped {sum(problems.values())} bad annotation(s)/image(s): {parts}",
                  file=sys.stderr)  # fmt: skip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        im = self.images[i]
        img = load_image(im["path"])
        target = {
            "boxes": torch.tensor(im["boxes"], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(im["labels"], dtype=torch.long),
            "image_id": int(im["id"]),
        }
        return img, target


def build_det_dataset(name: str, root: str | Path | None, split: str):
    if name != "coco":
        raise ValueError(f"unknown detection dataset {name!r}; known: coco")
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (data.root / --data-root)")
    part, start, stop = parse_split(split)
    ds = CocoDetection(root, part)
    if start is None and stop is None:
        return ds
    n = len(ds)
    return Split(ds, range(n)[slice(split_bound(start, n), split_bound(stop, n))], split)


# ---- transforms ---------------------------------------------------------------------------------------


def _keep_valid(target: dict, boxes: torch.Tensor, size: tuple[int, int], min_side: float = 1.0) -> dict:
    """Clip boxes to ``size = (H, W)`` and drop the degenerate ones (a side under ``min_side`` pixels)."""
    h, w = size
    boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                         boxes[:, 3].clamp(0, h)], 1) if len(boxes) else boxes  # fmt: skip
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)
    return dict(target, boxes=boxes[keep], labels=target["labels"][keep])


def random_iou_crop(img: Image.Image, target: dict, rng: np.random.Generator, tries: int = 40):
    """SSD's sample crop (Liu et al. 2016): the whole image, or a crop (sides 0.3-1 of the image, aspect 0.5-2)
    whose IoU with some box is at least a threshold drawn from {0.1, 0.3, 0.5, 0.7, 0.9}; boxes whose centre
    falls outside the crop are dropped, the rest clipped to it."""
    from vitkit.tasks.detection.boxes import box_iou

    boxes = target["boxes"]
    choice = int(rng.integers(6))
    if choice == 0 or len(boxes) == 0:
        return img, target
    min_iou = (0.1, 0.3, 0.5, 0.7, 0.9)[choice - 1]
    w, h = img.size
    for _ in range(tries):
        cw, ch = int(w * rng.uniform(0.3, 1.0)), int(h * rng.uniform(0.3, 1.0))
        if not 0.5 <= cw / max(ch, 1) <= 2 or cw < 1 or ch < 1:
            continue
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = torch.tensor([[x0, y0, x0 + cw, y0 + ch]], dtype=torch.float32)
        if box_iou(boxes, crop).max() < min_iou:
            continue
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (centre[:, 0] > x0) & (centre[:, 0] < x0 + cw) & (centre[:, 1] > y0) & (centre[:, 1] < y0 + ch)
        if not inside.any():
            continue
        shifted = boxes[inside] - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        sub = dict(target, boxes=boxes[inside], labels=target["labels"][inside])
        return img.crop((x0, y0, x0 + cw, y0 + ch)), _keep_valid(sub, shifted, (ch, cw))
    return img, target


def resize_pad(img: Image.Image, boxes: torch.Tensor, size: tuple[int, int], interp: str = "bilinear", fill=0):
    """Resize keeping the aspect ratio so the image fits ``size = (H, W)``, pad right and bottom; boxes follow."""
    h, w = size
    s = min(h / img.height, w / img.width)
    nw, nh = max(1, round(img.width * s)), max(1, round(img.height * s))
    canvas = Image.new(img.mode, (w, h), fill)
    canvas.paste(img.resize((nw, nh), interpolation(interp)), (0, 0))
    scale = torch.tensor([nw / img.width, nh / img.height, nw / img.width, nh / img.height])
    return canvas, boxes * scale


class DetTransform:
    """Training (``train=True``): photometric distortion, SSD's random IoU crop, horizontal flip, then resize
    (keep ratio) and pad to the input size; evaluation: resize and pad only. Boxes are clipped and degenerate ones
    dropped after every geometric step. Returns the normalised image and the target with ``orig_size`` and
    ``scale`` (input pixels per original pixel), so predictions map back to the original image."""

    def __init__(self, data_config: dict, train: bool = False, hflip: float = 0.5, iou_crop: bool = True,
                 photometric: bool = True):  # fmt: skip
        self.dc, self.train, self.hflip = data_config, train, hflip
        self.iou_crop, self.photometric = iou_crop and train, photometric and train

    def __call__(self, img, target=None, rng=None, size=None):
        c, *default = self.dc["input_size"]
        h, w = size or default
        img = img.convert("L" if c == 1 else "RGB")
        target = target or {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
        orig = (img.height, img.width)
        if self.photometric:
            img = photometric(img, rng)
        if self.iou_crop:
            img, target = random_iou_crop(img, target, rng)
        boxes = target["boxes"]
        if self.train and self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = torch.stack([img.width - boxes[:, 2], boxes[:, 1], img.width - boxes[:, 0], boxes[:, 3]], 1)
        scale = min(h / img.height, w / img.width)
        fill = tuple(round(m * 255) for m in self.dc["mean"][:c])
        img, boxes = resize_pad(img, boxes.reshape(-1, 4), (h, w), fill=fill[0] if c == 1 else fill)
        target = _keep_valid(dict(target, orig_size=orig, scale=scale), boxes, (h, w))
        return to_tensor(img, self.dc["mean"], self.dc["std"]), target


def det_collate(batch: list):
    """``(images [B, C, H, W], [target dicts], failures)`` (the transform gives every image the same size)."""
    good = [b for b in batch if not isinstance(b, Failed)]
    failed = [b for b in batch if isinstance(b, Failed)]
    if not good:
        return None, None, failed
    return torch.stack([b[0] for b in good]), [b[1] for b in good], failed


# ---- MNIST canvases in COCO format -------------------------------------------------------------------


def write_mnist_detection(
    digits: np.ndarray, labels: np.ndarray, out: str | Path, n_train: int = 2000, n_val: int = 500,
    train_digits: int = 8000, size: int = 128, seed: int = 0, **canvas_kwargs,
) -> Path:  # fmt: skip
    """Write MNIST digit canvases as a COCO detection dataset (categories 1..10 named '0'..'9'); ``train`` canvases
    from the first ``train_digits`` digit images, ``val`` from the rest. Boxes are tight around stroke pixels."""
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": d + 1, "name": str(d)} for d in range(10)]
    parts = {"train": (slice(0, train_digits), n_train), "val": (slice(train_digits, None), n_val)}
    for k, (split, (pool, n)) in enumerate(parts.items()):
        (out / split).mkdir(exist_ok=True)
        canvases = make_canvases(digits[pool], labels[pool], n, seed=seed * 2 + 1000 + k, size=size, **canvas_kwargs)
        images, anns = [], []
        for j, cv in enumerate(canvases):
            name = f"{split}_{j:05d}.png"
            Image.fromarray(cv.image).save(out / split / name)
            images.append({"id": j + 1, "file_name": name, "width": size, "height": size,
                           "digit_sources": [i + (pool.start or 0) for i in cv.sources]})  # fmt: skip
            for lab, (x0, y0, x1, y1) in zip(cv.labels, cv.boxes):
                anns.append({"id": len(anns) + 1, "image_id": j + 1, "category_id": lab + 1, "iscrowd": 0,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})  # fmt: skip
        data = {"images": images, "annotations": anns, "categories": categories}
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return out
