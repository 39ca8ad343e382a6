"""MNIST / Fashion-MNIST in the original IDX format (gzip-compressed or not), read from local files.

The IDX header is a big-endian magic (``0x00000803`` images, ``0x00000801`` labels) followed by the
dimension sizes; every file is checked against it and against its own length, so a truncated or
mismatched file is an error that names it, never silently short data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

_DTYPES = {0x08: np.uint8}
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# md5 of the decompressed test files (as published with the files in ../shared/data/mnist)
KNOWN_MD5 = {
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"MNIST: neither {stem} nor {stem}.gz found in {str(root)!r}")


def read_idx(path: str | os.PathLike, verify_md5: bool = True) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a NumPy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"IDX file {str(path)!r} could not be read (truncated or corrupt?): {e}") from None
    if len(data) < 4:
        raise ValueError(f"IDX file {str(path)!r} is too short to hold a header ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in _DTYPES or not 1 <= ndim <= 4:
        raise ValueError(f"IDX file {str(path)!r} has a bad magic number {data[:4].hex()}")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f"IDX file {str(path)!r} holds {len(data)} bytes; its header {dims} needs {expected}")
    stem = path.name.removesuffix(".gz")
    if verify_md5 and stem in KNOWN_MD5 and hashlib.md5(data).hexdigest() != KNOWN_MD5[stem]:
        raise ValueError(f"IDX file {str(path)!r} does not match the published MNIST md5 {KNOWN_MD5[stem]}")
    return np.frombuffer(data, dtype=_DTYPES[dtype_code], offset=header).reshape(dims)


class MNIST(Dataset):
    """MNIST-format digits from ``root`` as ``(float image [1, H, W] in [0, 1], label)``.

    Args:
        root: folder holding the IDX files (``t10k-*`` for ``split='test'``, ``train-*`` for ``'train'``).
        split: 'train' or 'test'.
        indices: optional subset (e.g. ``range(8000)``) of the split.
    """

    def __init__(self, root: str | os.PathLike, split: str = "test", indices=None):
        if split not in FILES:
            raise ValueError(f"MNIST: split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        img_stem, lbl_stem = FILES[split]
        images = read_idx(_find(root, img_stem))
        labels = read_idx(_find(root, lbl_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"MNIST: images {images.shape} and labels {labels.shape} in {str(root)!r} do not match")
        if indices is not None:
            indices = np.asarray(list(indices))
            images, labels = images[indices], labels[indices]
        self.images = torch.from_numpy(images.copy())
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i].unsqueeze(0).float().div_(255.0), int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as one float tensor ``[N, 1, H, W]`` in [0, 1], and the labels."""
        return self.images.unsqueeze(1).float().div_(255.0), self.labels
