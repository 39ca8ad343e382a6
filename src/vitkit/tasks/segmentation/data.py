"""Segmentation data: VOC-style and ADE20K-style folders, mask-aware transforms, and the MNIST canvas writer.

* ``voc``: ``root/JPEGImages/<id>.jpg`` (or .png), ``root/SegmentationClass/<id>.png`` (palette or grey PNG whose
  values are class indices, 255 = ignore), ``root/ImageSets/Segmentation/<split>.txt``; class names from
  ``root/classes.txt`` when present, else the 21 PASCAL VOC classes.
* ``ade20k``: ``root/images/<split>/*.jpg`` and ``root/annotations/<split>/*.png`` with 0 = "other" (ignored) and
  1..150 the classes, shifted to 0..149 as mmsegmentation's ``reduce_zero_label`` does; split ``train`` reads the
  ``training`` folders, ``val`` the ``validation`` ones; names from ``root/classes.txt`` (else ``class_<i>``).

A mask whose size differs from its image, or that holds a label outside the classes other than the ignore index,
raises :class:`~vitkit.data.images.BadAnnotation` naming the file: the loaders skip, count and report it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vitkit.data.canvas import make_canvases
from vitkit.data.datasets import parse_split, split_bound
from vitkit.data.images import BadAnnotation, Split, load_image
from vitkit.data.transforms import interpolation, photometric, to_tensor

IGNORE = 255
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def voc_palette(n: int = 256) -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved RGB per index) as a flat PIL palette."""
    pal = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _read_classes(root: Path, default: list[str]) -> list[str]:
    f = root / "classes.txt"
    return [line.strip() for line in f.read_text().splitlines() if line.strip()] if f.is_file() else default


class _MaskDataset(Dataset):
    """``(PIL image, label array)`` pairs from ``self.samples`` = [(image path, mask path)], masks validated."""

    samples: list[tuple[Path, Path]]
    classes: list[str]
    channels = None  # each file is converted to the model's channels
    reduce_zero_label = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img_path, mask_path = self.samples[i]
        img = load_image(img_path)
        mask = np.asarray(load_image(mask_path), dtype=np.int64)
        if mask.ndim != 2:
            raise BadAnnotation(mask_path, f"mask has {mask.shape[-1]} channels; expected one band of class indices")
        if mask.shape != (img.height, img.width):
            raise BadAnnotation(
                mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]}, its image {img.width}x{img.height}"
            )
        if self.reduce_zero_label:
            mask = np.where(mask == 0, IGNORE, mask - 1)
            mask[mask == IGNORE - 1] = IGNORE
        bad = np.unique(mask[(mask != IGNORE) & ((mask < 0) | (mask >= len(self.classes)))])
        if len(bad):
            raise BadAnnotation(
                mask_path, f"labels {bad[:5].tolist()} outside the {len(self.classes)} classes (ignore: {IGNORE})"
            )
        return img, mask


class VOCSegmentation(_MaskDataset):
    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        lst = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not lst.is_file():
            raise FileNotFoundError(f"VOC segmentation: split list {str(lst)!r} not found")
        ids = [line.split()[0] for line in lst.read_text().splitlines() if line.strip()]
        self.samples = []
        for i in ids:
            img = next((p for p in (root / "JPEGImages" / f"{i}{e}" for e in (".jpg", ".png")) if p.is_file()), None)
            self.samples.append((img or root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png"))
        self.classes = _read_classes(root, VOC_CLASSES)


class ADE20K(_MaskDataset):
    reduce_zero_label = True

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        folder = {"train": "training", "val": "validation"}.get(split, split)
        images = root / "images" / folder
        if not images.is_dir():
            raise FileNotFoundError(f"ADE20K: image folder {str(images)!r} not found")
        self.samples = [
            (p, root / "annotations" / folder / f"{p.stem}.png")
            for p in sorted(images.iterdir())
            if p.suffix.lower() in (".jpg", ".jpeg", ".png")
        ]
        self.classes = _read_classes(root, [f"class_{i}" for i in range(150)])


SEG_DATASETS = {"voc": VOCSegmentation, "ade20k": ADE20K}


def build_seg_dataset(name: str, root: str | Path | None, split: str):
    """A segmentation dataset by name, with the classification sets' slice syntax (``"val[:100]"``)."""
    if name not in SEG_DATASETS:
        raise ValueError(f"unknown segmentation dataset {name!r}; known: {', '.join(SEG_DATASETS)}")
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (data.root / --data-root)")
    part, start, stop = parse_split(split)
    ds = SEG_DATASETS[name](root, part)
    if start is None and stop is None:
        return ds
    n = len(ds)
    return Split(ds, range(n)[slice(split_bound(start, n), split_bound(stop, n))], split)


# ---- transforms ---------------------------------------------------------------------------------------


def _resize_pair(img: Image.Image, mask: np.ndarray, w: int, h: int, interp: str):
    img = img.resize((w, h), interpolation(interp))
    mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.NEAREST), dtype=np.int64)
    return img, mask


class SegTrainTransform:
    """Random scale (``scale`` x the crop size on the long side), random crop with ignore padding, flip and
    photometric distortion; returns the normalised image and the label map ``(H, W)`` int64."""

    def __init__(self, data_config: dict, scale=(0.5, 2.0), hflip: float = 0.5, photometric: bool = True):
        self.dc, self.scale, self.hflip, self.photometric = data_config, tuple(scale), hflip, photometric

    def __call__(self, img, mask, rng, size=None):
        c, *default = self.dc["input_size"]
        h, w = size or default
        img = img.convert("L" if c == 1 else "RGB")
        s = rng.uniform(*self.scale) * max(h, w) / max(img.size)
        img, mask = _resize_pair(img, mask, max(1, round(img.width * s)), max(1, round(img.height * s)), "bilinear")
        # pad to at least the crop (image with the mean colour, mask with the ignore index), then crop
        ph, pw = max(h - img.height, 0), max(w - img.width, 0)
        if ph or pw:
            fill = tuple(round(m * 255) for m in self.dc["mean"][:c])
            canvas = Image.new(img.mode, (img.width + pw, img.height + ph), fill[0] if c == 1 else fill)
            canvas.paste(img, (0, 0))
            img, mask = canvas, np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE)
        y0, x0 = int(rng.integers(0, img.height - h + 1)), int(rng.integers(0, img.width - w + 1))
        img, mask = img.crop((x0, y0, x0 + w, y0 + h)), mask[y0 : y0 + h, x0 : x0 + w]
        if self.hflip > 0 and rng.random() < self.hflip:
            img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask[:, ::-1]
        if self.photometric:
            img = photometric(img, rng)
        return to_tensor(img, self.dc["mean"], self.dc["std"]), torch.from_numpy(np.ascontiguousarray(mask))


class SegEvalTransform:
    """Resize the image (bilinear) and the mask (nearest) to the model's input size; no other change. ``mask`` None
    (prediction): the image alone."""

    def __init__(self, data_config: dict):
        self.dc = data_config

    def __call__(self, img, mask=None, rng=None, size=None):
        c, *default = self.dc["input_size"]
        h, w = size or default
        img = img.convert("L" if c == 1 else "RGB")
        if mask is None:
            return to_tensor(img.resize((w, h), interpolation("bilinear")), self.dc["mean"], self.dc["std"]), None
        img, mask = _resize_pair(img, mask, w, h, "bilinear")
        return to_tensor(img, self.dc["mean"], self.dc["std"]), torch.from_numpy(mask)


# ---- MNIST canvases in the VOC layout -----------------------------------------------------------------


def write_mnist_segmentation(
    digits: np.ndarray, labels: np.ndarray, out: str | Path, n_train: int = 2000, n_val: int = 500,
    train_digits: int = 8000, size: int = 128, seed: int = 0, **canvas_kwargs,
) -> Path:  # fmt: skip
    """Write MNIST digit canvases as a VOC-style segmentation dataset: 11 classes (background, digits 0-9).

    ``train`` canvases use the first ``train_digits`` digit images, ``val`` canvases the rest, so no handwritten
    digit appears in both; ``sources.json`` lists each canvas's digit indices. Images are lossless PNGs in
    ``JPEGImages/`` (the loader takes either extension).
    """
    out = Path(out)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    parts = {"train": (slice(0, train_digits), n_train), "val": (slice(train_digits, None), n_val)}
    sources = {}
    for k, (split, (pool, n)) in enumerate(parts.items()):
        canvases = make_canvases(digits[pool], labels[pool], n, seed=seed * 2 + k, size=size, **canvas_kwargs)
        ids = []
        for j, cv in enumerate(canvases):
            name = f"{split}_{j:05d}"
            sources[name] = [i + (pool.start or 0) for i in cv.sources]
            Image.fromarray(cv.image).save(out / "JPEGImages" / f"{name}.png")
            m = Image.fromarray(cv.mask.astype(np.uint8), mode="P")
            m.putpalette(palette)
            m.save(out / "SegmentationClass" / f"{name}.png")
            ids.append(name)
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (out / "classes.txt").write_text("\n".join(["background"] + [str(d) for d in range(10)]) + "\n")
    (out / "sources.json").write_text(json.dumps(sources))
    return out
