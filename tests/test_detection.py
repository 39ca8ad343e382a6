"""Object detection: box-operation properties, anchors, the COCO loader's bad-annotation report, mAP equal to
pycocotools run directly, parameter counts against the paper, an overfit that recovers the boxes, the raw-head
ONNX export, and train -> eval -> predict through the CLI on canvases of real digits."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import vitkit
from vitkit.bench import count_params
from vitkit.cli import main as cli
from vitkit.data.canvas import make_canvases
from vitkit.data.datasets import Digits
from vitkit.tasks.detection.boxes import BoxCoder, batched_nms, box_iou, generalized_box_iou, nms
from vitkit.tasks.detection.data import CocoDetection, write_mnist_detection
from vitkit.tasks.detection.metrics import coco_evaluate

needs_coco = pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None, reason="pycocotools not installed")


def _boxes(draw, n):
    xy = draw(st.lists(st.tuples(*[st.floats(0, 100)] * 2, *[st.floats(1, 60)] * 2), min_size=n, max_size=n))
    return torch.tensor([[x, y, x + w, y + h] for x, y, w, h in xy], dtype=torch.float64)


@st.composite
def box_sets(draw, lo=1, hi=12):
    return _boxes(draw, draw(st.integers(lo, hi)))


@settings(max_examples=60, deadline=None)
@given(box_sets(), box_sets())
def test_iou_properties(a, b):
    iou = box_iou(a, b)
    assert torch.allclose(iou, box_iou(b, a).T) and ((iou >= 0) & (iou <= 1 + 1e-12)).all()
    assert torch.allclose(box_iou(a, a).diagonal(), torch.ones(len(a), dtype=a.dtype))
    far = b + 1000.0  # disjoint from every box of a
    assert (box_iou(a, far) == 0).all()
    giou = generalized_box_iou(a, b)
    assert (giou <= iou + 1e-12).all() and (giou >= -1 - 1e-12).all()


@settings(max_examples=60, deadline=None)
@given(box_sets(), st.sampled_from([(1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)]))
def test_decode_inverts_encode(boxes, stds):
    anchors = boxes.flip(0) + 3.0
    coder = BoxCoder(stds)
    torch.testing.assert_close(coder.decode(coder.encode(boxes, anchors), anchors), boxes, rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(box_sets(1, 20), st.floats(0.1, 0.9), st.integers(0, 2**31 - 1))
def test_nms_keeps_cluster_heads_and_nothing_overlapping(boxes, thresh, seed):
    scores = torch.rand(len(boxes), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    keep = nms(boxes, scores, thresh)
    kept = boxes[keep]
    # nothing kept overlaps another kept box above the threshold
    iou = box_iou(kept, kept)
    assert (iou.fill_diagonal_(0) <= thresh).all()
    # the highest-scoring box is always kept; every dropped box overlaps a higher-scoring kept box
    assert keep[0] == scores.argmax()
    for i in set(range(len(boxes))) - set(keep.tolist()):
        higher = keep[scores[keep] > scores[i]]
        assert (box_iou(boxes[i : i + 1], boxes[higher]) > thresh).any()
    # class-wise: boxes of other classes never suppress each other
    labels = torch.arange(len(boxes))
    assert len(batched_nms(boxes, scores, labels, thresh)) == len(boxes)


def test_anchor_counts_per_level():
    ssd = vitkit.create_model("ssdlite_mobilevit_s", num_classes=80)
    cls, reg = ssd.forward_raw(torch.zeros(1, 3, 320, 320))
    # maps 20, 10, 5, 3, 2, 1; 6 anchors per cell except 4 on the 1x1 level: 3,232 (cvnets' count)
    assert cls.shape == (1, 6 * (400 + 100 + 25 + 9 + 4) + 4, 81) and reg.shape[1] == 3232
    ret = vitkit.create_model("retinanet_lavit_tiny", num_classes=3, img_size=128)
    cls, reg, shapes = ret.heads(torch.zeros(1, 3, 128, 128))
    assert shapes == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)] and cls.shape[1] == 9 * (256 + 64 + 16 + 4 + 1)
    a = ret.anchors(shapes, (128, 128))
    w = a[:, 2] - a[:, 0]
    # the first level's nine anchors around one cell: sizes 32 * 2^(k/3), aspect ratios 1:2, 1:1, 2:1
    assert torch.allclose(
        torch.sqrt(w[:9] * (a[:9, 3] - a[:9, 1])), torch.tensor([32 * 2 ** (k / 3) for k in range(3)] * 3)
    )


def test_ssdlite_parameters_match_the_paper():
    """MobileViT paper (and ml-cvnets): SSDLite MobileViT-XS 2.7M, -S 5.7M with 81 classes (80 + background)."""
    for name, paper in (("ssdlite_mobilevit_xs", 2.7e6), ("ssdlite_mobilevit_s", 5.7e6)):
        with torch.device("meta"):
            n = count_params(vitkit.create_model(name, num_classes=80))
        assert abs(n - paper) / paper < 0.02, (name, n)


def _coco_file(tmp_path: Path, anns: list[dict], images=None) -> Path:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    for i in (1, 2):
        Image.new("L", (40, 30)).save(root / "train" / f"{i}.png")
    images = images or [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in (1, 2)]
    cats = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    return root


def test_coco_loader_counts_and_drops_bad_annotations(tmp_path, capsys):
    good = {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5]}
    anns = [
        good,
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [35, 3, 10, 5]},  # reaches outside the 40-px image
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [1, 1, 0, 4]},  # zero area
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [5, 5, -3, 4]},  # negative size
        {"id": 5, "image_id": 2, "category_id": 99, "bbox": [1, 1, 4, 4]},  # unknown category
        {"id": 6, "image_id": 9, "category_id": 3, "bbox": [1, 1, 4, 4]},  # unknown image
        {"id": 7, "image_id": 3, "category_id": 3, "bbox": [1, 1, 4, 4]},  # its image file is missing
    ]
    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in (1, 2, 3)]
    ds = CocoDetection(_coco_file(tmp_path, anns, images), "train")
    assert ds.report["dropped"] == {
        "box outside the image": 1, "zero-area box": 1, "negative box size": 1,
        "category_id not in categories": 1, "image_id not in images": 1, "image file missing": 1,
    }  # fmt: skip
    assert "annotation 2 of image 1" in ds.report["examples"]["box outside the image"]
    assert "dropped 6 bad annotation(s)/image(s)" in capsys.readouterr().err
    assert len(ds) == 2 and ds.classes == ["three", "seven"]  # sorted by category id; contiguous labels
    img, t = ds[0]
    assert t["boxes"].tolist() == [[2, 3, 12, 8]] and t["labels"].tolist() == [1]
    bad = tmp_path / "bad" / "annotations"
    bad.mkdir(parents=True)
    (bad / "instances_train.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"instances_train.json' is not valid JSON"):
        CocoDetection(tmp_path / "bad", "train")


@needs_coco
def test_map_is_what_pycocotools_gives_directly(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5], "area": 50, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [5, 5, 20, 10], "area": 200, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 7, "bbox": [20, 2, 8, 8], "area": 64, "iscrowd": 0},
    ]
    ds = CocoDetection(_coco_file(tmp_path, anns), "train")
    dets = [
        {"image_id": 1, "category_id": 7, "bbox": [2.5, 3, 10, 5], "score": 0.9},
        {"image_id": 2, "category_id": 3, "bbox": [6, 5, 18, 10], "score": 0.8},
        {"image_id": 2, "category_id": 7, "bbox": [0, 0, 5, 5], "score": 0.7},
        {"image_id": 2, "category_id": 3, "bbox": [20, 2, 8, 8], "score": 0.3},
    ]
    ours = coco_evaluate(ds.coco_gt, dets, ds.classes)
    gt = COCO()
    gt.dataset = json.loads((tmp_path / "coco" / "annotations" / "instances_train.json").read_text())
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert [ours[k] for k in ("map", "map50", "map75", "map_small", "map_medium", "map_large")] == list(ev.stats[:6])
    assert ours["per_class_ap"][1] == pytest.approx(ev.eval["precision"][:, :, 1, 0, -1].mean())


def _canvases(n: int, size: int = 96):
    ds = Digits("train")
    digits = np.stack([np.asarray(ds[i][0].resize((28, 28), Image.BILINEAR)) for i in range(100)])
    return make_canvases(digits, ds.labels[:100], n, seed=1, size=size, count=(1, 2), scale=(28, 48))


def test_overfitting_a_few_canvases_recovers_their_boxes():
    torch.manual_seed(0)
    cvs = _canvases(4)
    x = torch.stack([torch.from_numpy(c.image).float()[None] / 255 for c in cvs])
    targets = [{"boxes": torch.tensor(c.boxes, dtype=torch.float32), "labels": torch.tensor(c.labels)} for c in cvs]
    m = vitkit.create_model("ssdlite_mobilevit_xxs", num_classes=10, img_size=96, in_chans=1)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0)
    first = None
    for _ in range(100):
        m.train()
        loss = sum(m(x, targets).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.4 * first
    m.eval()
    with torch.no_grad():
        preds = m(x)
    for p, t in zip(preds, targets):
        for box, label in zip(t["boxes"], t["labels"]):
            same = p["labels"] == label
            assert same.any() and box_iou(p["boxes"][same][:3], box[None]).max() > 0.5, (box, label, p)


@pytest.mark.slow  # 25 s: ONNX export and onnxruntime stay in the default run through test_bench's runtime check
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_raw_head_exports_to_onnx_and_matches(tmp_path):
    import onnxruntime as ort

    from vitkit.export import export_onnx

    m = vitkit.create_model("ssdlite_mobilevit_xxs", num_classes=10, img_size=128).eval()
    path = export_onnx(m, tmp_path / "ssd.onnx", (3, 128, 128), dynamic_batch=True)
    x = torch.randn(2, 3, 128, 128)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cls, reg = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref_cls, ref_reg = m.forward_raw(x)
    for ours, ref in ((cls, ref_cls), (reg, ref_reg)):
        assert np.abs(ours - ref.numpy()).max() / np.abs(ref.numpy()).max() < 1e-4
    # and the documented postprocess on the exported outputs gives the eager detections
    cls_t, reg_t = torch.from_numpy(cls), torch.from_numpy(reg)
    anchors = m.anchors([tuple(s) for s in m.heads(x)[2]], (128, 128))
    dets = m.postprocess(cls_t, reg_t, anchors, (128, 128))
    with torch.no_grad():
        eager = m(x)
    assert all(torch.allclose(d["scores"], e["scores"], atol=1e-4) for d, e in zip(dets, eager))


@needs_coco
def test_detection_trains_evaluates_and_predicts_through_the_cli(tmp_path, capsys):
    ds = Digits("train")
    digits = np.stack([np.asarray(ds[i][0].resize((28, 28), Image.BILINEAR)) for i in range(300)])
    root = write_mnist_detection(digits, ds.labels[:300], tmp_path / "det", n_train=16, n_val=4, train_digits=200,
                                 size=96)  # fmt: skip
    args = ["train", "--output", str(tmp_path / "run")]
    for s in [
        "model.name=ssdlite_mobilevit_xxs", "model.img_size=96", "model.in_chans=1", "data.dataset=coco",
        f"data.root={root}", "data.train_split=train", "data.val_split=val", "data.batch_size=8",
        "sched.epochs=1", "train.progress=false", "train.ema_decay=0",
    ]:  # fmt: skip
        args += ["--set", s]
    assert cli(args) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "eval.json").read_text())["summary"]
    assert summary["task"] == "detection" and summary["score"] == "map" and summary["global_step"] == 2
    assert cli(["eval", str(run), "--which", "last"]) == 0
    res = json.loads((run / "eval" / "eval.json").read_text())
    assert res["images"] == 4 and 0 <= res["map"] <= 1 and len(res["per_class_ap"]) == 10
    capsys.readouterr()
    pics = sorted((root / "val").glob("*.png"))[:2]
    assert cli(["predict", str(run), *map(str, pics), "--out", str(tmp_path / "pred"), "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 2 and all(isinstance(p["detections"], list) for p in preds)
    assert all((tmp_path / "pred" / f"{p.stem}_boxes.png").is_file() for p in pics)
    assert not math.isnan(res["map"])


def test_bench_measures_a_detector_with_its_real_train_step():
    from torch.utils.flop_counter import FlopCounterMode

    from vitkit.bench.speed import bench_model
    from vitkit.layers import use_fused_attn

    row = bench_model("ssdlite_mobilevit_xxs", img_size=128, batch=2, repeats=1, train=True, memory=False,
                      layout="nchw", num_classes=10)  # fmt: skip
    # MACs of the network up to the raw head (decoding and NMS hold no MACs), counted here independently of
    # count_macs: the flop counter over forward_raw on real tensors (eager attention: the counter sees no CPU SDPA;
    # autograd on: under no_grad the CPU inference linears are oneDNN ops the counter does not see)
    model = vitkit.create_model("ssdlite_mobilevit_xxs", num_classes=10, img_size=128).eval()
    with use_fused_attn(False), FlopCounterMode(display=False) as counter:
        model.forward_raw(torch.zeros(1, 3, 128, 128))
    assert row.gmacs == pytest.approx(counter.get_total_flops() / 2e9, abs=1e-3) and row.gmacs > 0.05
    # no ordering of the two speeds: an untrained detector scores every anchor near 1/num_classes, so its
    # inference time is mostly NMS over the 1,000 candidates let in, which training does not run
    assert row.img_per_s > 0 and row.train_img_per_s > 0
