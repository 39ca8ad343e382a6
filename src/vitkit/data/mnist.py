"""MNIST / Fashion-MNIST in the original IDX format (gzip-compressed or not), read from local files.

The IDX header is a big-endian magic (``0x00000803`` images, ``0x00000801`` labels) followed by the
dimension sizes; every file is checked against it and against its own length, so a truncated or
mismatched file is an error that names it, never silently short data. Files whose name is a published
one are checked against its md5. ``download=True`` fetches the missing ``.gz`` files once, verified
against the published md5 of the archive, when a network exists (never at import, never in tests).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from vitkit._io import download as _download
from vitkit.data.images import ArrayImageDataset

_DTYPES = {0x08: np.uint8}
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# md5 of the decompressed MNIST test files (as published with the files in ../shared/data/mnist)
KNOWN_MD5 = {
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# md5 of the published .gz archives, per variant
SOURCES = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion_mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


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


class MNIST(ArrayImageDataset):
    """MNIST-format digits from ``root`` as ``(PIL 'L' image, label)``; ``tensors()`` gives them all at once.

    Args:
        root: folder holding the IDX files (``t10k-*`` for ``split='test'``, ``train-*`` for ``'train'``).
        split: 'train' or 'test'.
        indices: optional subset (e.g. ``range(8000)``) of the split.
        download: fetch missing files (md5-verified) from the published source.
        verify: check files with a published name against their md5.
    """

    variant = "mnist"
    classes_list = [str(i) for i in range(10)]

    def __init__(self, root, split: str = "test", indices=None, download: bool = False, verify: bool = True):
        if split not in FILES:
            raise ValueError(f"{type(self).__name__}: split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        paths = []
        for stem in FILES[split]:
            path = _find(root, stem)
            if path is None and download:
                base, md5s = SOURCES[self.variant]
                path = _download(base + stem + ".gz", root / (stem + ".gz"), md5s[stem + ".gz"], "md5")
            if path is None:
                raise FileNotFoundError(
                    f"{type(self).__name__}: neither {stem} nor {stem}.gz in {str(root)!r} (download=True fetches it)"
                )
            paths.append(path)
        verify_md5 = verify and self.variant == "mnist"
        images, labels = (read_idx(p, verify_md5) for p in paths)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{type(self).__name__}: images {images.shape} and labels {labels.shape} in {root} differ")
        super().__init__(images, labels, self.classes_list, indices)


class FashionMNIST(MNIST):
    """Fashion-MNIST (same IDX layout as MNIST)."""

    variant = "fashion_mnist"
    classes_list = FASHION_CLASSES
