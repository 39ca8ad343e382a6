"""Semantic segmentation: metrics against hand counts, the ignore index, bad masks reported, the MNIST canvas
writer, model geometry, and train -> eval -> predict through the CLI on canvases of real digits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from conftest import MNIST
from vitkit.cli import main as cli
from vitkit.data.canvas import STROKE, make_canvases
from vitkit.data.datasets import Digits
from vitkit.data.images import BadAnnotation
from vitkit.data.loader import TransformView
from vitkit.runtime import DistInfo
from vitkit.tasks.segmentation.data import SegTrainTransform, VOCSegmentation, write_mnist_segmentation
from vitkit.tasks.segmentation.metrics import SegmentationCounter, confusion, scores


def digit_pool(n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Real handwritten digits always available offline: scikit-learn's 8x8 digits, upsampled to MNIST's 28x28."""
    ds = Digits("train")
    imgs = np.stack([np.asarray(ds[i][0].resize((28, 28), Image.BILINEAR)) for i in range(n)])
    return imgs, ds.labels[:n]


def test_miou_and_pixel_accuracy_match_hand_counts():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = confusion(pred, target, 3)
    # rows = truth: class 0 -> (0: 1, 1: 1); class 1 -> (1: 2); class 2 -> (2: 1, 0: 1); ignored pixels count nowhere
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]] and cm.sum() == 6
    s = scores(cm)
    # IoU_c = tp / (gt + pred - tp): 0 -> 1/(2+2-1), 1 -> 2/(2+3-2), 2 -> 1/(2+1-1)
    assert s["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3) and s["pixel_acc"] == pytest.approx(4 / 6)
    # a class absent from truth and prediction has no IoU and leaves the mean alone
    s4 = scores(confusion(pred, target, 4))
    assert s4["per_class_iou"][3] is None and s4["miou"] == pytest.approx(s["miou"])
    # the counter: logits at stride 2 are upsampled to the mask; ignored pixels carry no loss
    counter = SegmentationCounter(3)
    logits = torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1)[None].float() * 10
    counter.update(logits, target[None])
    res = counter.result(DistInfo())
    assert res["miou"] == pytest.approx(s["miou"]) and res["pixels"] == 6 and res["images"] == 1


def test_canvases_are_deterministic_with_tight_boxes_and_stroke_masks():
    imgs, labels = digit_pool()
    a = make_canvases(imgs, labels, 6, seed=3, size=96, scale=(20, 40))
    b = make_canvases(imgs, labels, 6, seed=3, size=96, scale=(20, 40))
    assert all(np.array_equal(x.image, y.image) and x.boxes == y.boxes for x, y in zip(a, b))
    for cv in a:
        assert 1 <= len(cv.labels) <= 5 and cv.mask.shape == cv.image.shape == (96, 96)
        for lab, (x0, y0, x1, y1) in zip(cv.labels, cv.boxes):
            inside = cv.mask[y0:y1, x0:x1] == lab + 1
            # tight: the stroke pixels of this digit touch all four sides of its box
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert ((cv.mask > 0) <= (cv.image >= STROKE)).all()  # masks lie on stroke pixels


def test_voc_writer_loader_and_bad_masks_are_reported(tmp_path):
    imgs, labels = digit_pool()
    root = write_mnist_segmentation(imgs, labels, tmp_path / "seg", n_train=6, n_val=3, train_digits=300, size=64)
    train, val = VOCSegmentation(root, "train"), VOCSegmentation(root, "val")
    sources = json.loads((root / "sources.json").read_text())  # train canvases from digits < 300, val from >= 300
    assert all(i < 300 for k, v in sources.items() if k.startswith("train") for i in v)
    assert all(i >= 300 for k, v in sources.items() if k.startswith("val") for i in v)
    assert len(train) == 6 and len(val) == 3 and train.classes == ["background"] + [str(d) for d in range(10)]
    img, mask = train[0]
    assert img.size == (64, 64) and mask.shape == (64, 64) and set(np.unique(mask)) <= set(range(11))
    # a mask of the wrong size, and one with a label outside the 11 classes: each names its file
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "SegmentationClass" / "train_00001.png")
    Image.fromarray(np.full((64, 64), 40, np.uint8)).save(root / "SegmentationClass" / "train_00002.png")
    with pytest.raises(BadAnnotation, match=r"train_00001.png: mask is 32x32, its image 64x64"):
        train[1]
    with pytest.raises(BadAnnotation, match=r"train_00002.png: labels \[40\] outside the 11 classes"):
        train[2]
    # through the loader: counted as failures, never trained on
    view = TransformView(train, SegTrainTransform(vitkit.resolve_data_config(_model(11)), (1, 1), 0.0), 0, joint=True)
    got = [view[(i, 0, 64, 64)] for i in range(len(train))]
    failed = [g for g in got if not isinstance(g, tuple)]
    assert [Path(f.path).name for f in failed] == ["train_00001.png", "train_00002.png"]


def _model(num_classes: int):
    return vitkit.create_model("semfpn_nest_tiny", num_classes=num_classes, img_size=64, in_chans=1)


@pytest.mark.parametrize("name", ["semfpn_lavit_tiny", "semfpn_halonet26t", "semfpn_vit_small"])
@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_semantic_fpn_returns_stride_4_logits(name, size):
    m = vitkit.create_model(name, num_classes=5, img_size=size).eval()
    with torch.no_grad():
        y = m(torch.randn(1, 3, *size))
    assert y.shape == (1, 5, size[0] // 4, size[1] // 4) and torch.isfinite(y).all()


def test_segmentation_trains_evaluates_and_predicts_through_the_cli(tmp_path, capsys):
    imgs, labels = digit_pool()
    root = write_mnist_segmentation(imgs, labels, tmp_path / "seg", n_train=48, n_val=8, train_digits=300, size=64)
    args = ["train", "--output", str(tmp_path / "run")]
    for s in [
        "model.name=semfpn_nest_tiny", "model.img_size=64", "model.in_chans=1", "data.dataset=voc",
        f"data.root={root}", "data.train_split=train", "data.val_split=val", "data.batch_size=8",
        "sched.epochs=2", "train.progress=false", "optim.lr=1e-3", "task.photometric=false",
    ]:  # fmt: skip
        args += ["--set", s]
    assert cli(args) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "eval.json").read_text())["summary"]
    assert summary["task"] == "segmentation" and summary["global_step"] == 12
    epochs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    assert len(epochs) == 2 and epochs[1]["train_loss"] < epochs[0]["train_loss"]  # it learns
    assert cli(["eval", str(run), "--which", "last"]) == 0
    res = json.loads((run / "eval" / "eval.json").read_text())
    assert res["images"] == 8 and res["pixels"] == 8 * 64 * 64 and 0 <= res["miou"] <= 1
    assert (run / "eval" / "confusion.png").is_file()
    capsys.readouterr()
    pics = sorted((root / "JPEGImages").glob("val_*.png"))[:2]
    assert cli(["predict", str(run), *map(str, pics), "--out", str(tmp_path / "pred"), "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 2 and all("_labels" not in p and "background" in p["classes"] for p in preds)
    for p in pics:
        lab = Image.open(tmp_path / "pred" / f"{p.stem}_labels.png")
        over = Image.open(tmp_path / "pred" / f"{p.stem}_overlay.png")
        assert lab.size == over.size == (64, 64) and lab.mode == "P"


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"the real MNIST digits are not at {MNIST} (../shared beside a clone)")
def test_mnist_segmentation_command_draws_train_and_val_from_disjoint_digits(tmp_path):
    out = tmp_path / "mseg"
    assert cli(["data", "mnist-segmentation", str(out), "--mnist", str(MNIST), "--train", "4", "--val", "2"]) == 0
    assert len(VOCSegmentation(out, "train")) == 4 and len(VOCSegmentation(out, "val")) == 2
    again = tmp_path / "again"
    assert cli(["data", "mnist-segmentation", str(again), "--mnist", str(MNIST), "--train", "4", "--val", "2"]) == 0
    for f in sorted((out / "SegmentationClass").iterdir()):
        assert f.read_bytes() == (again / "SegmentationClass" / f.name).read_bytes()  # deterministic by seed


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (256, 224)])
def test_deeplabv3_runs_at_output_stride_16_at_any_size_divisible_by_32(size):
    m = vitkit.create_model("deeplabv3_mobilevit_xxs", num_classes=4).eval()
    with torch.no_grad():
        feats = m.forward_features(torch.randn(1, 3, *size))
        y = m(torch.randn(1, 3, *size))
    assert feats.shape[-2:] == y.shape[-2:] == (size[0] // 16, size[1] // 16) and y.shape[1] == 4
    # the atrous branches: 3x3 at dilation 6, 12, 18 with padding = dilation (same size out)
    assert [c.conv.dilation[0] for c in m.aspp.convs[1:]] == [6, 12, 18]
    assert all(c.conv.padding[0] == c.conv.dilation[0] for c in m.aspp.convs[1:])
    # the last stage's downsampling block keeps stride 1 (at OS16 nothing is dilated, as in cvnets / transformers)
    last = m.backbone.model.stages[-1][0].conv2_kxk.conv
    assert last.stride == (1, 1) and last.dilation == (1, 1)
    os8 = vitkit.create_model("mobilevit_xxs", output_stride=8).stages[-1][0].conv2_kxk.conv
    assert os8.stride == (1, 1) and os8.dilation == (2, 2)


def test_deeplabv3_parameters_equal_transformers_and_the_paper():
    """transformers' MobileViTForSemanticSegmentation (21 labels, OS16) has 1,854,853 / 2,944,069 / 6,357,941
    parameters for XXS / XS / S (counted in the fixture venv); the paper rounds them to 1.9M / 2.9M / 6.4M."""
    from vitkit.bench import count_params

    for v, n in (("xxs", 1_854_853), ("xs", 2_944_069), ("s", 6_357_941)):
        with torch.device("meta"):
            assert count_params(vitkit.create_model(f"deeplabv3_mobilevit_{v}", num_classes=21)) == n


@pytest.mark.slow  # ~20 s: bench's train step and ONNX export of a dense model (detection's ONNX head runs by default)
def test_segmentation_models_bench_and_export_verified(tmp_path):
    from vitkit.bench.speed import bench_model
    from vitkit.export import export_model

    row = bench_model("deeplabv3_mobilevit_xxs", img_size=64, batch=2, repeats=1, train=True, memory=False,
                      layout="nchw", num_classes=5)  # fmt: skip
    assert row.gmacs > 0 and row.img_per_s > 0 and row.train_img_per_s > 0  # timings are for benchmarks
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed (the optional export extra): the export half is not checked")
    model = vitkit.create_model("deeplabv3_mobilevit_xxs", num_classes=5, img_size=64).eval()
    res = export_model(model, tmp_path / "dl.onnx", "onnx", dynamic_batch=True, check_batches=(1, 2))
    assert max(res["max_abs_diff"].values()) < 1e-4
