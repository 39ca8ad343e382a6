"""Training and evaluation transforms without torchvision: Pillow for geometry/colour, torch for the rest.

Every random transform takes an explicit ``numpy.random.Generator``. The training loader seeds one per
sample from ``(seed, epoch, index)``, so an image's augmentation does not depend on worker count, batch
composition or where a resumed run restarts: that is what makes a killed-and-resumed run bitwise
identical to an uninterrupted one.

* ``RandomResizedCrop``, ``PadRandomCrop``, ``hflip``: geometry (the crop sizes of the DeiT/HaloNet recipes).
* ``RandAugment``: timm's ``rand-m9-n2-mstd0.5`` policy (15 ops, each applied with probability 0.5,
  magnitude drawn from N(m, mstd) and clipped to [0, 10]).
* ``RandomErasing``: on the normalised tensor, random-normal fill (timm's 'pixel' mode).
* ``mix_batch``: mixup / cutmix on a batch with soft, label-smoothed targets; ``soft_cross_entropy``.
* ``EvalTransform``: resize the short side to ``size / crop_pct``, centre crop (timm's eval pipeline).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

_INTERP = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def interpolation(name: str) -> int:
    if name not in _INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {name!r}")
    return _INTERP[name]


def random_resized_crop(
    img: Image.Image,
    size,
    rng: np.random.Generator,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    interp: str = "bicubic",
) -> Image.Image:
    """Inception-style crop: area fraction in ``scale``, aspect ratio log-uniform in ``ratio``, resized to ``size``."""
    h_out, w_out = _pair(size)
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            break
    else:  # fall back to a centre crop at the clamped aspect ratio
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, round(w / ratio[0])
        elif in_ratio > ratio[1]:
            ch, cw = h, round(h * ratio[1])
        else:
            cw, ch = w, h
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    return img.resize((w_out, h_out), interpolation(interp), box=(x0, y0, x0 + cw, y0 + ch))


def pad_random_crop(img: Image.Image, size, rng: np.random.Generator, pad: int, interp="bicubic", fill=0):
    """Resize to ``size`` if needed, zero-pad by ``pad`` pixels and take a random ``size`` crop (CIFAR/MNIST style)."""
    h_out, w_out = _pair(size)
    if img.size != (w_out, h_out):
        img = img.resize((w_out, h_out), interpolation(interp))
    if pad <= 0:
        return img
    padded = ImageOps.expand(img, border=pad, fill=fill)
    x0, y0 = int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))
    return padded.crop((x0, y0, x0 + w_out, y0 + h_out))


def place_on_canvas(img: Image.Image, size, rng: np.random.Generator, interp: str = "bicubic"):
    """Paste ``img`` unscaled (shrunk to fit if larger) at a random place on a zero canvas of ``size``.

    Returns the canvas and the pasted box ``(y0, x0, y1, x1)``.
    """
    h_out, w_out = _pair(size)
    w, h = img.size
    if w > w_out or h > h_out:
        s = min(w_out / w, h_out / h)
        w, h = max(1, int(w * s)), max(1, int(h * s))
        img = img.resize((w, h), interpolation(interp))
    y0, x0 = int(rng.integers(0, h_out - h + 1)), int(rng.integers(0, w_out - w + 1))
    canvas = Image.new(img.mode, (w_out, h_out), 0)
    canvas.paste(img, (x0, y0))
    return canvas, (y0, x0, y0 + h, x0 + w)


def resize_center_crop(img: Image.Image, size, crop_pct: float = 1.0, interp: str = "bicubic") -> Image.Image:
    """timm's eval pipeline: scale so the crop is ``crop_pct`` of the short side, then centre-crop ``size``."""
    h_out, w_out = _pair(size)
    w, h = img.size
    scale = max(h_out, w_out) / crop_pct / min(w, h)
    rw, rh = max(w_out, round(w * scale)), max(h_out, round(h * scale))
    img = img.resize((rw, rh), interpolation(interp))
    x0, y0 = (rw - w_out) // 2, (rh - h_out) // 2
    return img.crop((x0, y0, x0 + w_out, y0 + h_out))


# ---- RandAugment ---------------------------------------------------------------------------------


def _signed(v: float, rng) -> float:
    return -v if rng.random() < 0.5 else v


def _affine(img, matrix, fill):
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=fill)


def _solarize_add(img, add):
    lut = [min(255, i + add) if i < 128 else i for i in range(256)] * len(img.getbands())
    return img.point(lut)


# op -> f(img, magnitude in [0, 10], rng, fill); levels follow timm's auto_augment.py
_OPS = {
    "AutoContrast": lambda im, m, rng, f: ImageOps.autocontrast(im),
    "Equalize": lambda im, m, rng, f: ImageOps.equalize(im),
    "Invert": lambda im, m, rng, f: ImageOps.invert(im),
    "Rotate": lambda im, m, rng, f: im.rotate(_signed(m / 10 * 30, rng), resample=Image.BILINEAR, fillcolor=f),
    "Posterize": lambda im, m, rng, f: ImageOps.posterize(im, max(1, 8 - int(m / 10 * 4))),
    "Solarize": lambda im, m, rng, f: ImageOps.solarize(im, 256 - int(m / 10 * 256)),
    "SolarizeAdd": lambda im, m, rng, f: _solarize_add(im, int(m / 10 * 110)),
    "Color": lambda im, m, rng, f: ImageEnhance.Color(im).enhance(m / 10 * 1.8 + 0.1),
    "Contrast": lambda im, m, rng, f: ImageEnhance.Contrast(im).enhance(m / 10 * 1.8 + 0.1),
    "Brightness": lambda im, m, rng, f: ImageEnhance.Brightness(im).enhance(m / 10 * 1.8 + 0.1),
    "Sharpness": lambda im, m, rng, f: ImageEnhance.Sharpness(im).enhance(m / 10 * 1.8 + 0.1),
    "ShearX": lambda im, m, rng, f: _affine(im, (1, _signed(m / 10 * 0.3, rng), 0, 0, 1, 0), f),
    "ShearY": lambda im, m, rng, f: _affine(im, (1, 0, 0, _signed(m / 10 * 0.3, rng), 1, 0), f),
    "TranslateXRel": lambda im, m, rng, f: _affine(im, (1, 0, _signed(m / 10 * 0.45, rng) * im.size[0], 0, 1, 0), f),
    "TranslateYRel": lambda im, m, rng, f: _affine(im, (1, 0, 0, 0, 1, _signed(m / 10 * 0.45, rng) * im.size[1]), f),
}


@dataclass
class RandAugment:
    """RandAugment (Cubuk et al. 2019) as in timm: ``num_ops`` ops drawn uniformly, each applied with prob ``p``."""

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    p: float = 0.5
    fill: int | tuple[int, ...] = 0

    @classmethod
    def from_string(cls, spec: str, fill=0) -> RandAugment:
        """Parse timm's config string, e.g. ``rand-m9-n2-mstd0.5``."""
        parts = spec.split("-")
        if not parts or parts[0] != "rand":
            raise ValueError(f"RandAugment spec must start with 'rand', got {spec!r} (e.g. 'rand-m9-mstd0.5')")
        kw = {}
        names = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "p": "p"}
        for part in parts[1:]:
            m = re.fullmatch(r"(mstd|m|n|p)(\d+(?:\.\d+)?)", part)
            if m is None:
                raise ValueError(f"RandAugment spec {spec!r}: unknown part {part!r} (known: m, n, mstd, p)")
            kw[names[m[1]]] = float(m[2])
        kw["num_ops"] = int(kw.get("num_ops", 2))
        return cls(fill=fill, **kw)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        names = list(_OPS)
        for k in rng.choice(len(names), size=self.num_ops, replace=True):
            if rng.random() > self.p:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = float(np.clip(rng.normal(m, self.magnitude_std), 0, 10))
            img = _OPS[names[int(k)]](img, m, rng, self.fill)
        return img


def photometric(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """mmsegmentation's PhotoMetricDistortion, each step with probability 0.5: brightness (+-32 of 255), contrast
    and (colour images) saturation (x0.5-1.5), hue (+-18 of 180 degrees)."""
    if rng.random() < 0.5:
        img = ImageEnhance.Brightness(img).enhance(1.0 + rng.uniform(-32, 32) / 128)
    if rng.random() < 0.5:
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.5, 1.5))
    if img.mode == "RGB":
        if rng.random() < 0.5:
            img = ImageEnhance.Color(img).enhance(rng.uniform(0.5, 1.5))
        if rng.random() < 0.5:
            h, s, v = img.convert("HSV").split()
            shift = int(rng.integers(-18, 19)) * 256 // 180
            h = h.point(lambda x: (x + shift) % 256)
            img = Image.merge("HSV", (h, s, v)).convert("RGB")
    return img


# ---- tensors -------------------------------------------------------------------------------------


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL image -> normalised float tensor ``[C, H, W]``."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr[..., None] if arr.ndim == 2 else arr).permute(2, 0, 1)
    c = x.shape[0]
    mean_t = torch.tensor(list(mean)[:c] if len(mean) >= c else list(mean) * c, dtype=torch.float32)
    std_t = torch.tensor(list(std)[:c] if len(std) >= c else list(std) * c, dtype=torch.float32)
    return ((x - mean_t[:, None, None]) / std_t[:, None, None]).contiguous()


def random_erasing(x: torch.Tensor, rng: np.random.Generator, p: float, scale=(0.02, 1 / 3), ratio=(0.3, 3.3)):
    """Erase one random rectangle of a normalised ``[C, H, W]`` tensor with N(0, 1) noise, with probability ``p``."""
    if p <= 0 or rng.random() >= p:
        return x
    c, h, w = x.shape
    for _ in range(10):
        target = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        eh, ew = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < eh < h and 0 < ew < w:
            y0, x0 = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            x = x.clone()
            x[:, y0 : y0 + eh, x0 : x0 + ew] = torch.from_numpy(rng.standard_normal((c, eh, ew)).astype(np.float32))
            return x
    return x


def one_hot_smooth(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((target.shape[0], num_classes), off).scatter_(1, target[:, None], 1.0 - smoothing + off)


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    rng: np.random.Generator,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (one per batch, as timm's 'batch' mode) with the reversed batch as partner.

    Returns the mixed images and soft targets ``lam * y + (1 - lam) * y_reversed``, label-smoothed.
    """
    soft = one_hot_smooth(y, num_classes, smoothing).to(x.device)
    if not (mixup_alpha > 0 or cutmix_alpha > 0) or rng.random() >= prob:
        return x, soft
    cut = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    alpha = cutmix_alpha if cut else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if cut:
        h, w = x.shape[-2:]
        rh, rw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, h)
        x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    else:
        x = x * lam + x.flip(0) * (1 - lam)
    return x, soft * lam + soft.flip(0) * (1 - lam)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy against soft targets (mixup / label smoothing), mean over the batch."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# ---- pipelines -----------------------------------------------------------------------------------


@dataclass
class TrainTransform:
    """One training pipeline: crop -> flip -> RandAugment -> tensor/normalise -> random erasing.

    ``crop`` is 'rrc' (random-resized-crop with ``scale``), 'pad' (resize, pad by ``pad``, random crop),
    'canvas' (the image unscaled at a random place on a blank canvas of ``size``; shrunk first if larger) or
    'resize'. Called as ``t(img, rng, size)`` so the multi-scale sampler can pick the size per batch.
    """

    size: tuple[int, int]
    mean: Sequence[float]
    std: Sequence[float]
    in_chans: int = 3
    crop: str = "rrc"
    scale: tuple[float, float] = (0.08, 1.0)
    pad: int = 4
    hflip: float = 0.5
    randaugment: str | None = None
    erasing: float = 0.0
    interp: str = "bicubic"

    def __post_init__(self):
        if self.crop not in ("rrc", "pad", "canvas", "resize"):
            raise ValueError(f"aug.crop must be 'rrc', 'pad', 'canvas' or 'resize', got {self.crop!r}")
        interpolation(self.interp)
        fill = tuple(round(m * 255) for m in self.mean[: self.in_chans])
        self._fill = fill[0] if self.in_chans == 1 else fill
        self._ra = RandAugment.from_string(self.randaugment, fill=self._fill) if self.randaugment else None

    def __call__(self, img: Image.Image, rng: np.random.Generator, size=None) -> torch.Tensor:
        size = _pair(size or self.size)
        img = img.convert("L" if self.in_chans == 1 else "RGB")
        if self.crop == "rrc":
            img = random_resized_crop(img, size, rng, self.scale, interp=self.interp)
        elif self.crop == "pad":
            img = pad_random_crop(img, size, rng, self.pad, self.interp)  # zero padding, as torchvision's RandomCrop
        elif self.crop == "canvas":
            img, _ = place_on_canvas(img, size, rng, self.interp)
        elif img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), interpolation(self.interp))
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self._ra is not None:
            img = self._ra(img, rng)
        return random_erasing(to_tensor(img, self.mean, self.std), rng, self.erasing)


@dataclass
class EvalTransform:
    """Resize so the centre crop is ``crop_pct`` of the short side, crop ``size``, normalise."""

    size: tuple[int, int]
    mean: Sequence[float]
    std: Sequence[float]
    in_chans: int = 3
    crop_pct: float = 1.0
    interp: str = "bicubic"
    canvas: bool = False  # centre the image unscaled on a blank canvas (for models trained with crop='canvas')

    @classmethod
    def from_data_config(cls, dc: dict) -> EvalTransform:
        """From a data config (``resolve_data_config`` keys, plus the training run's ``eval_canvas``)."""
        c, h, w = dc["input_size"]
        return cls((h, w), dc["mean"], dc["std"], c, dc["crop_pct"], dc["interpolation"], dc.get("eval_canvas", False))

    def __call__(self, img: Image.Image, rng=None, size=None) -> torch.Tensor:
        img = img.convert("L" if self.in_chans == 1 else "RGB")
        if self.canvas:
            h, w = _pair(size or self.size)
            img = place_on_canvas(img, (h, w), _Centre())[0]
        else:
            img = resize_center_crop(img, size or self.size, self.crop_pct, self.interp)
        return to_tensor(img, self.mean, self.std)


class _Centre:
    """A stand-in generator whose integers(lo, hi) is the middle of the range (centred placement)."""

    def integers(self, lo, hi):
        return (lo + hi - 1) // 2
