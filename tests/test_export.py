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
