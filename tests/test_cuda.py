"""Dense tasks on a CUDA device: every tensor a loss or a post-processing step makes lives on the input's device.

Skipped without a GPU (CI has none); run where one is lent: ``pytest tests/test_cuda.py``. Each check compares the
device result with the same computation on the CPU, in fp32, to a tolerance of the order of GPU-vs-CPU summation
differences (the GPU's TF32 is switched off for the comparison).
"""

from __future__ import annotations

import copy

import pytest
import torch

import vitkit
from vitkit.tasks.detection.boxes import batched_nms, nms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (these run where a GPU is lent)")


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _on(model: torch.nn.Module, dev: str) -> torch.nn.Module:
    """A copy of ``model`` on ``dev`` without randomness (dropout and drop-path off): each device starts from the same
    weights and BatchNorm statistics."""
    m = copy.deepcopy(model).to(dev)
    for mod in m.modules():
        for attr in ("p", "drop_prob"):
            if isinstance(getattr(mod, attr, None), float):
                setattr(mod, attr, 0.0)
    return m


def _targets(n: int, size: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = 12 + torch.rand(3, 2, generator=g) * size * 0.3
        out.append({"boxes": torch.cat([xy, xy + wh], 1).to(device), "labels": torch.tensor([0, 3, 7], device=device)})
    return out


@pytest.mark.parametrize("name", ["ssdlite_mobilevit_xxs", "retinanet_lavit_tiny"])
def test_detector_losses_and_detections_on_cuda_equal_the_cpu(name):
    torch.manual_seed(0)
    model = vitkit.create_model(name, num_classes=10, img_size=128)
    x = torch.randn(2, 3, 128, 128)
    results = {}
    for dev in ("cpu", "cuda"):
        m = _on(model, dev).train()
        losses = m(x.to(dev), _targets(2, 128, dev))
        sum(losses.values()).backward()
        grads = [p.grad.detach().cpu().clone() for p in m.parameters() if p.grad is not None]
        m.zero_grad(set_to_none=True)
        with torch.no_grad():
            dets = m.eval()(x.to(dev))
        assert all(d["boxes"].device.type == dev for d in dets)
        dets = [{k: v.cpu() for k, v in d.items()} for d in dets]
        results[dev] = ({k: float(v.detach()) for k, v in losses.items()}, grads, dets)
    (l_cpu, g_cpu, d_cpu), (l_gpu, g_gpu, d_gpu) = results["cpu"], results["cuda"]
    assert l_cpu == pytest.approx(l_gpu, rel=1e-4)
    # gradients as one vector: hard-negative mining and anchor matching pick by ranking, so a near-tie the two
    # devices round apart moves single small gradients (a 1e-5 bias gradient by 1e-6) without moving the whole
    g_cpu, g_gpu = torch.cat([g.flatten() for g in g_cpu]), torch.cat([g.flatten() for g in g_gpu])
    assert torch.isfinite(g_gpu).all() and float((g_gpu - g_cpu).norm() / g_cpu.norm()) < 1e-3
    for a, b in zip(d_cpu, d_gpu):  # the top detections agree (ties far down the list may order differently)
        n = min(len(a["scores"]), len(b["scores"]), 20)
        torch.testing.assert_close(b["scores"][:n], a["scores"][:n], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(b["boxes"][:n], a["boxes"][:n], rtol=1e-3, atol=1e-2)


def test_nms_on_cuda_keeps_the_cpu_boxes_and_returns_on_cuda():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(500, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(500, 2, generator=g) * 30], 1)
    scores, labels = torch.rand(500, generator=g), torch.randint(0, 5, (500,), generator=g)
    keep = nms(boxes.cuda(), scores.cuda(), 0.5)
    assert keep.device.type == "cuda" and torch.equal(keep.cpu(), nms(boxes, scores, 0.5))
    keep = batched_nms(boxes.cuda(), scores.cuda(), labels.cuda(), 0.5)
    assert keep.device.type == "cuda" and torch.equal(keep.cpu(), batched_nms(boxes, scores, labels, 0.5))
    empty = batched_nms(boxes[:0].cuda(), scores[:0].cuda(), labels[:0].cuda(), 0.5)
    assert empty.device.type == "cuda" and empty.numel() == 0


@pytest.mark.parametrize("name", ["deeplabv3_mobilevit_xxs", "semfpn_lavit_tiny"])
def test_segmentation_train_step_on_cuda_equals_the_cpu(name):
    from vitkit.config import TrainConfig
    from vitkit.tasks import build_task

    cfg = TrainConfig.from_dict({"model": {"name": name, "num_classes": 5}, "data": {"dataset": "voc"}})
    task = build_task(cfg)
    torch.manual_seed(0)
    model = vitkit.create_model(name, num_classes=5, img_size=64)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    y[:, :4] = 255  # ignored pixels
    out = {}
    for dev in ("cpu", "cuda"):
        m = _on(model, dev).train()
        loss = task.losses(m, x.to(dev), y.to(dev))["ce"]
        loss.backward()
        out[dev] = float(loss), [p.grad.detach().cpu().clone() for p in m.parameters() if p.grad is not None]
        m.zero_grad(set_to_none=True)
    assert out["cpu"][0] == pytest.approx(out["cuda"][0], rel=1e-4)
    for a, b in zip(out["cpu"][1], out["cuda"][1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()) + 1e-8)
