"""Image basics every dataset shares: guarded decoding, in-memory arrays, and named slices of a dataset.

A dataset yields ``(PIL image, target)`` and declares ``classes`` (names) and ``channels`` (1 or 3 for
images stored with a fixed number of channels; None where each file is decoded and converted to what the
model takes, as in an image folder). Decoding happens inside a guarded block: a corrupt, truncated,
zero-byte or decompression-bomb file raises :class:`ImageDecodeError` naming the file, which the loaders
count and skip.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class ImageDecodeError(Exception):
    """An image file that Pillow could not decode safely."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class BadAnnotation(ImageDecodeError):
    """A sample whose annotation is invalid (a mask of another size, labels outside the classes, a box outside
    the image): skipped, counted and reported like an undecodable image, never trained or evaluated on."""


def load_image(path: str | os.PathLike, max_pixels: int | None = Image.MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode ``path`` fully with Pillow, or raise ImageDecodeError (empty, corrupt, truncated, too many pixels)."""
    try:
        if os.path.getsize(path) == 0:
            raise ImageDecodeError(path, "zero-byte file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if max_pixels is not None and img.width * img.height > max_pixels:
                    raise ImageDecodeError(path, f"{img.width}x{img.height} exceeds the {max_pixels}-pixel limit")
                img.load()  # decode now, so truncation is caught here and not in a transform
                return img.copy()
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(path, f"{type(e).__name__}: {e}") from None


class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 array ``[N, H, W]`` or ``[N, H, W, C]`` with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], indices=None):
        if indices is not None:
            indices = np.asarray(list(indices), dtype=np.int64)
            images, labels = images[indices], labels[indices]
        self.images = np.require(images, dtype=np.uint8, requirements=["C", "W"])  # copies read-only buffers
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.channels = 1 if self.images.ndim == 3 else int(self.images.shape[-1])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i]), int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as one float tensor ``[N, C, H, W]`` in [0, 1], and the labels."""
        x = torch.from_numpy(self.images).float().div_(255.0)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
        return x, torch.from_numpy(self.labels)


class Split(Dataset):
    """The images ``indices`` of ``dataset`` (a named slice such as ``"test[:8000]"``), keeping its metadata."""

    def __init__(self, dataset: Dataset, indices, name: str = ""):
        self.dataset, self.indices, self.name = dataset, list(indices), name
        self.classes = list(dataset.classes)
        self.channels = getattr(dataset, "channels", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]
