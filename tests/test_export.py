"""Export: torch.export and ONNX (dynamo exporter) for MobileViT, checked in onnxruntime."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import vitkit

MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


def test_mobilevit_xxs_torch_export_dynamic_batch():
    model = vitkit.create_model("mobilevit_xxs").eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (torch.randn(2, 3, 256, 256),), dynamic_shapes={"x": {0: batch}})
    for b in (1, 4):
        x = torch.randn(b, 3, 256, 256)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(
    bool(MISSING), reason=f"ONNX export extra not installed (missing {MISSING}); pip install vitkit[export]"
)
@pytest.mark.slow  # the per-family ONNX check covers MobileViT-XXS in the slow run too
def test_mobilevit_xxs_onnx_matches_pytorch(tmp_path):
    import onnxruntime as ort

    model = vitkit.create_model("mobilevit_xxs").eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(
        model, (torch.randn(1, 3, 256, 256),), dynamo=True, dynamic_shapes={"x": {0: batch}}, verbose=False
    )
    path = tmp_path / "mobilevit_xxs.onnx"
    program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for b in (1, 4):
        x = torch.randn(b, 3, 256, 256)
        out = sess.run(None, {name: x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4


class _Counter(torch.nn.Module):
    """Reads Python state in forward: a trace bakes the value in, so the traced module and eager disagree."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.calls


@pytest.mark.parametrize(  # TorchScript is deprecated (torch 2.13): one family by default, the rest in the slow run
    "name",
    ["nest_tiny"]
    + [
        pytest.param(n, marks=pytest.mark.slow)
        for n in ("halonet26t", "mobilevit_xxs", "vit_tiny_patch16_224", "lavit_tiny")
    ],
)
def test_frozen_trace_with_onednn_graph_matches_eager(name):
    """The TorchScript runtime of ``vitkit bench --runtime torchscript``, one model per family: the oneDNN Graph
    fuser's partitions (linear/conv epilogues, residual adds) compute the eager model's outputs."""
    from vitkit.export import onednn_graph_fusion, trace_frozen

    model = vitkit.create_model(name, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    before = torch._C._jit_llga_enabled()
    with onednn_graph_fusion(), torch.no_grad():
        traced = trace_frozen(model, x)
        outs = [traced(x) for _ in range(3)]  # profiling calls, then the fused plan
        ref = model(x)
    assert torch._C._jit_llga_enabled() == before  # the process-wide flag is restored
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_bench_refuses_a_trace_that_computes_something_else():
    from vitkit.bench.speed import _checked_trace

    with pytest.raises(RuntimeError, match="differs from eager"):
        _checked_trace(_Counter().eval(), torch.ones(2, 3), "fp32")


def test_trace_frozen_names_the_model_when_tracing_fails():
    from vitkit.export import ExportError, trace_frozen

    class _Branchy(torch.nn.Module):
        def forward(self, x):
            return {"not": "a tensor"}  # the tracer rejects non-tensor outputs

    with pytest.raises(ExportError, match="_Branchy: TorchScript tracing failed"):
        trace_frozen(_Branchy(), torch.ones(1))
