"""Image classification datasets read from local files: ImageFolder, CIFAR-10/100, scikit-learn's digits.

Every dataset yields ``(PIL image, label)`` and has ``classes`` and ``channels`` (see ``vitkit.data.images``);
transforms (``vitkit.data.transforms``) turn the image into a tensor. MNIST / Fashion-MNIST live in
``vitkit.data.mnist``. ``build_dataset`` picks one by name and takes TFDS-style split slices (``"test[:8000]"``,
``"test[8000:]"``, ``"train[:90%]"``).
"""

from __future__ import annotations

import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitkit._io import download, file_digest
from vitkit.data.images import IMG_EXTENSIONS, ArrayImageDataset, ImageDecodeError, Split, load_image
from vitkit.data.mnist import MNIST, FashionMNIST


class ImageFolder(Dataset):
    """``root/<class>/<image>``: classes are the sorted sub-folder names; images are found recursively.

    Errors before training for a missing root, a root without class folders, or a class without images.
    """

    def __init__(self, root: str | os.PathLike, max_pixels: int | None = Image.MAX_IMAGE_PIXELS):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolder: root {str(root)!r} does not exist or is not a folder")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise ValueError(f"ImageFolder: {str(root)!r} has no class sub-folders (expected root/<class>/<image>)")
        self.samples: list[tuple[str, int]] = []
        empty = []
        for label, cls in enumerate(self.classes):
            files = sorted(
                str(p) for p in (root / cls).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
            )
            if not files:
                empty.append(cls)
            self.samples += [(f, label) for f in files]
        if empty:
            raise ValueError(
                f"ImageFolder: class folder(s) {empty} in {str(root)!r} hold no images ({', '.join(IMG_EXTENSIONS)})"
            )
        self.root, self.max_pixels = root, max_pixels
        self.channels = None  # each file is converted to the model's channels when decoded

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return load_image(path, self.max_pixels), label


class _SafeUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow only what rebuilds NumPy arrays, so a crafted file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles (protocol 2) store an array's raw bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"CIFAR file {str(path)!r} could not be read: {e}") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


class CIFAR(ArrayImageDataset):
    """CIFAR-10 / CIFAR-100 from the python pickle batches (``cifar-10-batches-py/`` or ``cifar-100-python/``).

    Args:
        root: folder that holds the extracted batch folder (or the batch files themselves).
        split: 'train' or 'test'.
        num_classes: 10 or 100 (CIFAR-100 uses the fine labels).
        download: fetch and extract the published archive (md5-verified) when the files are missing.
        verify: check every batch file against its published md5.
    """

    SPEC = {
        10: dict(
            folder="cifar-10-batches-py",
            url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            archive_md5="c58f30108f718f92721af3b95e74349a",
            train=[
                ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
            ],
            test=[("test_batch", "40351d587109b95175f43aff81a1287e")],
            meta=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888", "label_names"),
            label_key="labels",
        ),
        100: dict(
            folder="cifar-100-python",
            url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
            train=[("train", "16019d7e3df5f24257cddd939b257f8d")],
            test=[("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")],
            meta=("meta", "7973b15100ade9c7d40fb424638fde48", "fine_label_names"),
            label_key="fine_labels",
        ),
    }

    def __init__(self, root, split="train", num_classes=10, indices=None, download=False, verify=True):
        if num_classes not in self.SPEC:
            raise ValueError(f"CIFAR: num_classes must be 10 or 100, got {num_classes}")
        if split not in ("train", "test"):
            raise ValueError(f"CIFAR-{num_classes}: split must be 'train' or 'test', got {split!r}")
        spec = self.SPEC[num_classes]
        folder = self._locate(Path(root), spec, download)
        xs, ys = [], []
        for name, md5 in spec[split]:
            batch = _read_pickle(self._checked(folder / name, md5, verify))
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(batch[spec["label_key"]], dtype=np.int64))
        meta_name, meta_md5, key = spec["meta"]
        meta = _read_pickle(self._checked(folder / meta_name, meta_md5, verify))
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[key]]
        super().__init__(np.concatenate(xs), np.concatenate(ys), classes, indices)

    @staticmethod
    def _locate(root: Path, spec: dict, fetch: bool) -> Path:
        for cand in (root / spec["folder"], root):
            if (cand / spec["test"][0][0]).is_file():
                return cand
        if not fetch:
            raise FileNotFoundError(
                f"CIFAR: no {spec['folder']}/ with its batch files under {str(root)!r} (download=True fetches it)"
            )
        archive = download(spec["url"], root / Path(spec["url"]).name, spec["archive_md5"], "md5")
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root, filter="data")
        return root / spec["folder"]

    @staticmethod
    def _checked(path: Path, md5: str, verify: bool) -> Path:
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR: batch file {str(path)!r} is missing")
        if verify and file_digest(path, "md5") != md5:
            raise ValueError(f"CIFAR: {str(path)!r} does not match its published md5 {md5} (pass verify=False?)")
        return path


class Digits(ArrayImageDataset):
    """scikit-learn's bundled handwritten digits (UCI optdigits test set, 1,797 8x8 images, 16 grey levels).

    Ships with scikit-learn, so it works offline on a fresh machine. The split is fixed: the first 1,437
    images ('train') and the last 360 ('test').
    """

    N_TRAIN = 1437

    def __init__(self, split: str = "train", indices=None):
        if split not in ("train", "test"):
            raise ValueError(f"Digits: split must be 'train' or 'test', got {split!r}")
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ImportError("the embedded 'digits' dataset needs scikit-learn (pip install scikit-learn)") from None
        d = load_digits()
        images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
        part = slice(0, self.N_TRAIN) if split == "train" else slice(self.N_TRAIN, None)
        super().__init__(images[part], d.target[part], [str(i) for i in range(10)], indices)


DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder")
_SPLIT = re.compile(r"^(?P<name>[A-Za-z0-9_\-]*)(\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\])?$")


def parse_split(split: str) -> tuple[str, str | None, str | None]:
    m = _SPLIT.match(split.strip())
    if m is None:
        raise ValueError(f"split {split!r} is not 'name' or 'name[start:stop]' (e.g. 'test[:8000]', 'train[90%:]')")
    return m["name"], m["start"] or None, m["stop"] or None


def split_bound(v: str | None, n: int) -> int | None:
    if v is None:
        return None
    return round(n * int(v[:-1]) / 100) if v.endswith("%") else int(v)


def build_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train", download: bool = False):
    """A dataset by name (``DATASETS``) and split, with an optional slice: ``"test[:8000]"``, ``"train[90%:]"``.

    For ``imagefolder`` the split names a sub-folder of ``root`` (``root/train/<class>/...``) when it exists,
    else ``root`` itself is the class folder.
    """
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    part, start, stop = parse_split(split)
    if key != "digits" and root is None:
        raise ValueError(f"dataset {name!r} needs a root folder (data.root / --data-root)")
    if key == "digits":
        ds = Digits(part)
    elif key in ("mnist", "fashion_mnist"):
        ds = (MNIST if key == "mnist" else FashionMNIST)(root, part, download=download)
    elif key in ("cifar10", "cifar100"):
        ds = CIFAR(root, part, num_classes=int(key[5:]), download=download)
    else:
        sub = Path(root) / part
        ds = ImageFolder(sub if part and sub.is_dir() else root)
    if start is None and stop is None:
        return ds
    n = len(ds)
    idx = range(n)[slice(split_bound(start, n), split_bound(stop, n))]
    if len(idx) == 0:
        raise ValueError(f"split {split!r} of {name!r} selects no images (the split holds {n})")
    return Split(ds, idx, split)


__all__ = [
    "CIFAR",
    "DATASETS",
    "IMG_EXTENSIONS",
    "ArrayImageDataset",
    "Digits",
    "FashionMNIST",
    "ImageDecodeError",
    "ImageFolder",
    "MNIST",
    "Split",
    "build_dataset",
    "load_image",
]
