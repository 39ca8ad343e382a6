"""Datasets and transforms: real files, guarded decoding, checksums, split slices, augmentation properties."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MNIST
from vitkit.data import mnist as mnist_mod
from vitkit.data.datasets import CIFAR, Digits, ImageDecodeError, ImageFolder, build_dataset, load_image
from vitkit.data.loader import Failed, TransformView, batch_plan, collate_skip, eval_plan
from vitkit.data.transforms import (
    _OPS,
    EvalTransform,
    RandAugment,
    TrainTransform,
    mix_batch,
    one_hot_smooth,
    random_erasing,
    random_resized_crop,
    resize_center_crop,
)

needs_mnist = pytest.mark.skipif(
    not (MNIST / "t10k-images-idx3-ubyte").exists() and not (MNIST / "t10k-images-idx3-ubyte.gz").exists(),
    reason=f"real MNIST files not found at {MNIST} (they live in ../shared beside a CI clone)",
)


def _png(path, size=(12, 10), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# ---- ImageFolder and guarded decoding --------------------------------------------------------------


def test_imagefolder_classes_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolder(tmp_path / "empty_root")
    _png(tmp_path / "ds" / "cat" / "a.png")
    _png(tmp_path / "ds" / "dog" / "sub" / "b.jpg")
    (tmp_path / "ds" / "eel").mkdir()
    (tmp_path / "ds" / "eel" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"\['eel'\].*hold no images"):
        ImageFolder(tmp_path / "ds")
    shutil.rmtree(tmp_path / "ds" / "eel")
    ds = ImageFolder(tmp_path / "ds")
    assert ds.classes == ["cat", "dog"] and len(ds) == 2
    img, label = ds[1]
    assert label == 1 and img.size == (12, 10)


def test_bad_images_are_reported_not_fatal(tmp_path):
    good = _png(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "a" / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    data = good.read_bytes()
    (tmp_path / "a" / "truncated.png").write_bytes(data[: len(data) // 2])
    _png(tmp_path / "a" / "huge.png", size=(300, 300))
    ds = ImageFolder(tmp_path, max_pixels=50_000)  # the 90,000-pixel image is a "bomb" at this limit
    reasons = {}
    for i, (path, _) in enumerate(ds.samples):
        try:
            ds[i]
        except ImageDecodeError as e:
            reasons[path.rsplit("/", 1)[-1]] = e.reason
    assert set(reasons) == {"zero.png", "garbage.jpg", "truncated.png", "huge.png"}
    assert "zero-byte" in reasons["zero.png"] and "pixel limit" in reasons["huge.png"]
    tf = EvalTransform((8, 8), [0.5] * 3, [0.5] * 3)
    view = TransformView(ds, tf)
    x, y, failed = collate_skip([view[(i, 0, 8, 8)] for i in range(len(ds))])
    assert x.shape == (1, 3, 8, 8) and len(failed) == 4 and all(isinstance(f, Failed) for f in failed)


def test_decompression_bomb_warning_is_an_error(tmp_path):
    path = _png(tmp_path / "big.png", size=(400, 400))
    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 100_000  # Pillow warns above this and errors above twice this
        with pytest.raises(ImageDecodeError, match="DecompressionBomb"):
            load_image(path, max_pixels=None)
    finally:
        Image.MAX_IMAGE_PIXELS = old


# ---- MNIST / CIFAR / digits ----------------------------------------------------------------------


@needs_mnist
def test_real_mnist_and_gzip_and_download(tmp_path, monkeypatch):
    ds = build_dataset("mnist", MNIST, "test")
    assert len(ds) == 10000 and ds.classes[3] == "3"
    x, y = ds.tensors()
    assert x.shape == (10000, 1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0
    assert np.bincount(y.numpy()).min() > 800  # every digit is there
    # the same files gzip-compressed, fetched through download=True from a local file:// source
    src = tmp_path / "src"
    src.mkdir()
    md5s = {}
    for stem in mnist_mod.FILES["test"]:
        raw = next(p for p in (MNIST / stem, MNIST / (stem + ".gz")) if p.exists())
        data = gzip.open(raw).read() if raw.suffix == ".gz" else raw.read_bytes()
        gz = gzip.compress(data)
        (src / (stem + ".gz")).write_bytes(gz)
        md5s[stem + ".gz"] = hashlib.md5(gz).hexdigest()
    monkeypatch.setitem(mnist_mod.SOURCES, "mnist", (src.as_uri() + "/", md5s))
    dest = tmp_path / "dest"
    got = mnist_mod.MNIST(dest, "test", download=True)
    assert torch.equal(got.tensors()[0], x) and sorted(p.name for p in dest.iterdir()) == sorted(md5s)
    # a wrong published checksum keeps nothing
    bad = dict(md5s, **{"t10k-images-idx3-ubyte.gz": "0" * 32})
    monkeypatch.setitem(mnist_mod.SOURCES, "mnist", (src.as_uri() + "/", bad))
    with pytest.raises(OSError, match="checksum mismatch"):
        mnist_mod.MNIST(tmp_path / "dest2", "test", download=True)
    assert not any((tmp_path / "dest2").glob("t10k-images*"))


def test_idx_errors_name_the_file(tmp_path):
    header = bytes([0, 0, 8, 3]) + (3).to_bytes(4, "big") + (2).to_bytes(4, "big") + (2).to_bytes(4, "big")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + bytes(5))  # 12 needed
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*holds"):
        mnist_mod.MNIST(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="train-images"):
        mnist_mod.MNIST(tmp_path, "train")


def _cifar_files(root, n=20):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        data[name] = (x, y)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": b"synthetic"}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    return data


def test_cifar_pickles_checksums_and_no_code(tmp_path):
    data = _cifar_files(tmp_path)
    with pytest.raises(ValueError, match="published md5"):
        CIFAR(tmp_path, "train")  # synthetic files are not the published ones
    ds = CIFAR(tmp_path, "train", verify=False)
    assert len(ds) == 100 and ds.classes[2] == "c2"
    x, y = ds.tensors()
    first = torch.from_numpy(data["data_batch_1"][0][0].reshape(3, 32, 32)).float() / 255
    assert torch.equal(x[0], first) and y[0] == data["data_batch_1"][1][0]

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="refusing to load shutil.rmtree"):
        CIFAR(tmp_path, "test", verify=False)
    assert (tmp_path / "victim").is_dir()
    with pytest.raises(FileNotFoundError, match="download=True"):
        CIFAR(tmp_path / "elsewhere", "train")


def test_digits_and_split_slices():
    train, test = Digits("train"), Digits("test")
    assert len(train) + len(test) == 1797 and train[0][0].size == (8, 8)
    assert len(build_dataset("digits", split="train[:100]")) == 100
    assert len(build_dataset("digits", split="train[90%:]")) == len(train) - round(len(train) * 0.9)
    with pytest.raises(ValueError, match="selects no images"):
        build_dataset("digits", split="test[400:]")
    with pytest.raises(ValueError, match="not 'name' or"):
        build_dataset("digits", split="test[::2]")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet22k", "/x")


# ---- transforms ----------------------------------------------------------------------------------


def _gradient(size=(20, 16), mode="RGB"):
    h, w = size
    arr = np.stack(np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)), -1)
    arr = np.concatenate([arr, arr[..., :1]], -1).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def test_geometry_transforms():
    img = _gradient((16, 16))
    rng = np.random.default_rng(0)
    same = random_resized_crop(img, 16, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert np.array_equal(np.asarray(same), np.asarray(img))  # a full, unit-ratio crop at the same size is exact
    out = random_resized_crop(_gradient((30, 50)), (12, 20), rng)
    assert out.size == (20, 12)
    assert np.array_equal(np.asarray(resize_center_crop(img, 16, 1.0)), np.asarray(img))
    c = resize_center_crop(_gradient((40, 40)), 20, crop_pct=0.5)  # no resize needed: the middle 20x20
    assert np.array_equal(np.asarray(c), np.asarray(_gradient((40, 40)))[10:30, 10:30])


def test_canvas_placement_keeps_the_pixels():
    from vitkit.data.transforms import place_on_canvas

    img = _gradient((10, 12), "L")
    canvas, (y0, x0, y1, x1) = place_on_canvas(img, 32, np.random.default_rng(3))
    arr = np.asarray(canvas)
    assert arr.shape == (32, 32) and (y1 - y0, x1 - x0) == (10, 12)
    assert np.array_equal(arr[y0:y1, x0:x1], np.asarray(img)) and arr.sum() == np.asarray(img).astype(int).sum()


def test_train_transform_is_keyed_and_normalised():
    t = TrainTransform((16, 16), [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], crop="rrc", randaugment="rand-m9-mstd0.5")
    img = _gradient()
    a = t(img, np.random.default_rng([1, 2, 3]))
    b = t(img, np.random.default_rng([1, 2, 3]))
    c = t(img, np.random.default_rng([1, 2, 4]))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (3, 16, 16)
    plain = TrainTransform((16, 16), [0.5], [0.25], in_chans=1, crop="resize", hflip=0.0)
    x = plain(_gradient((16, 16)), np.random.default_rng(0))
    expected = (np.asarray(_gradient((16, 16)).convert("L"), np.float32) / 255 - 0.5) / 0.25
    assert x.shape == (1, 16, 16) and np.allclose(x[0].numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="aug.crop"):
        TrainTransform((8, 8), [0.5], [0.5], crop="zoom")


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_every_randaugment_op_keeps_size_and_mode(mode):
    img = _gradient(mode=mode)
    for name, op in _OPS.items():
        out = op(img, 9.0, np.random.default_rng(0), 0 if mode == "L" else (0, 0, 0))
        assert out.size == img.size and out.mode == mode, name
    ra = RandAugment.from_string("rand-m9-n3-mstd0.5-p1.0")
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.p) == (3, 9.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="unknown part"):
        RandAugment.from_string("rand-m9-x3")


def test_random_erasing_and_label_smoothing():
    x = torch.zeros(3, 16, 16)
    assert torch.equal(random_erasing(x, np.random.default_rng(0), 0.0), x)
    e = random_erasing(x, np.random.default_rng(0), 1.0)
    changed = (e != 0).any(0)
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert changed.sum() > 0 and box.all()  # one filled rectangle
    t = one_hot_smooth(torch.tensor([2, 0]), 5, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(2)) and t[0, 2] == pytest.approx(0.92) and t[0, 1] == pytest.approx(0.02)


def test_mixup_and_cutmix_targets_match_the_pixels():
    x = torch.stack([torch.full((1, 8, 8), float(i)) for i in range(4)])
    y = torch.tensor([0, 1, 2, 3])
    xm, tm = mix_batch(x, y, 4, np.random.default_rng(0), mixup_alpha=0.8)
    lam = tm[0, 0].item()
    assert torch.allclose(xm[0], torch.full((1, 8, 8), 3 * (1 - lam)))  # partner of image 0 is image 3
    assert torch.allclose(tm.sum(1), torch.ones(4))
    xc, tc = mix_batch(x, y, 4, np.random.default_rng(1), cutmix_alpha=1.0)
    pasted = (xc[0] == 3).float().mean().item()
    assert tc[0, 3].item() == pytest.approx(pasted) and tc[0, 0].item() == pytest.approx(1 - pasted)
    xn, tn = mix_batch(x, y, 4, np.random.default_rng(0))
    assert xn is x and torch.equal(tn, torch.eye(4))


def test_batch_plans_cover_the_epoch_once():
    plan = batch_plan(103, 10, (8, 8), epoch=0, seed=1)
    idx = [k[0] for b in plan for k in b]
    assert len(plan) == 10 and len(set(idx)) == 100  # the incomplete tail is dropped
    assert plan == batch_plan(103, 10, (8, 8), epoch=0, seed=1) and plan != batch_plan(103, 10, (8, 8), 1, 1)
    ranks = [batch_plan(103, 5, (8, 8), 0, 1, world_size=2, rank=r) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == plan  # two ranks of 5 = one process of 10
    ms = batch_plan(500, 16, (64, 64), 0, 0, multiscale={"resolutions": [32, 64, 96], "base_res": 64})
    sizes = {(len(b), b[0][2]) for b in ms}
    assert {32, 64, 96} >= {s for _, s in sizes} and len({s for _, s in sizes}) > 1
    assert all(n == round(16 * 64 * 64 / (s * s)) for n, s in sizes if n != len(ms[-1]))
    ev = eval_plan(11, 4, (8, 8), world_size=2, rank=1)
    assert [k[0] for b in ev for k in b] == [6, 7, 8, 9, 10]
