"""On-device exports (ExecuTorch, OpenVINO, Core ML) through vitkit.export's one verification path.

Tolerances: fp32 artefacts compute the same function with another summation order and other kernels (XNNPACK,
oneDNN), so the outputs of these well-conditioned random models agree to a few float32 ulps of their largest
logit (measured 1e-6); 1e-4 relative is the fp32 bound used for every verified route. A wrong artefact (head
weights negated) is off by ~100% of the largest logit, far outside it.
"""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch

import vitkit
from conftest import ONE_PER_FAMILY
from vitkit import export
from vitkit.cli import main as cli


def _needs(module: str, extra: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"the optional '{extra}' extra is not installed: pip install 'vitkit[{extra}]'",
    )


EXTRA = {"executorch": "executorch", "openvino": "openvino", "coreml": "coremltools", "onnx": "onnxruntime"}


def _edge(slow: tuple[str, ...] = ()) -> list:
    """The on-device formats as test parameters, each skipped without its extra; those in ``slow`` marked slow."""
    return [
        pytest.param(f, marks=[_needs(EXTRA[f], export.REGISTRY[f].extra), *([pytest.mark.slow] if f in slow else [])])
        for f in ("executorch", "openvino", "coreml")
    ]


EDGE = _edge()
EDGE_DEFAULT = _edge(slow=("executorch",))  # ExecuTorch's XNNPACK lowering alone is ~20 s of the default run


def _tiny(**kwargs):
    torch.manual_seed(0)
    return vitkit.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=5, **kwargs).eval()


def _broken(model):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.head.weight.neg_()  # (a constant shift would cancel: the pooled features sum to ~0)
    return broken


@pytest.mark.parametrize("fmt", EDGE_DEFAULT)
def test_export_is_verified_and_a_wrong_artefact_fails(fmt, tmp_path):
    model = _tiny()
    res = export.export_model(model, tmp_path / f"m{export.SUFFIX[fmt]}", fmt)
    assert set(res["max_rel_err"]) == {1, 3} and max(res["max_rel_err"].values()) < 1e-4, res
    assert res["verified"] and res["tolerance"] == 1e-4
    if export.REGISTRY[fmt].runner is None:  # Core ML off macOS: the package's declared interface is checked
        assert "macOS" in res["ran"]
        inp, out = res["coreml"]["inputs"], res["coreml"]["outputs"]
        assert [i["name"] for i in inp] == ["x"] and inp[0]["ranges"][0] == (1, export.REGISTRY[fmt].max_batch)
        assert inp[0]["shape"][1:] == [3, 32, 32] and len(out) == 1  # (a dynamic batch: no declared output shape)
        assert {"conv", "linear", "softmax", "layer_norm"} <= set(res["coreml"]["ops"])
        # the artefact cannot be run here; the program it was converted from is, and a wrong one fails
        program = export.coreml.coreml_program(_broken(model), export.ExportSpec((3, 32, 32), max_batch=64))
        bad = export.verify(model, program.module(), (3, 32, 32))
    else:  # the artefact in its runtime against a model it was not exported from
        bad = export.verify(_broken(model), export.load(res["path"], fmt), (3, 32, 32))
    assert min(bad["max_rel_err"].values()) > 0.1, bad


@pytest.mark.slow  # (7 s; the default run keeps one check per format)
@_needs("openvino", "openvino")
def test_openvino_fp16_weights_are_asked_for_not_the_default(tmp_path):
    """OpenVINO's save_model compresses weights to fp16 unless told not to: the fp32 export must not be."""
    model = _tiny()
    fp32 = export.export_model(model, tmp_path / "a.xml", "openvino")
    fp16 = export.export_model(model, tmp_path / "b.xml", "openvino", precision="fp16")
    assert max(fp32["max_rel_err"].values()) < 1e-5 < max(fp16["max_rel_err"].values())
    assert fp16["verified"] and fp16["tolerance"] == 1e-2
    assert (tmp_path / "b.bin").stat().st_size < 0.6 * (tmp_path / "a.bin").stat().st_size


def test_precision_and_sizes_are_checked_per_format(tmp_path):
    with pytest.raises(ValueError, match="executorch exports fp32, not 'fp16'"):
        export.export_model(_tiny(), tmp_path / "m.pte", "executorch", precision="fp16")
    with pytest.raises(ValueError, match="torchscript exports one input size"):
        export.export_model(_tiny(), tmp_path / "m.pt", "torchscript", sizes=[64])
    with pytest.raises(ValueError, match="export format must be one of"):
        export.export_model(_tiny(), tmp_path / "m.x", "tflite")


def test_a_missing_extra_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'vitkit\[openvino\]'"):
        export.export_model(_tiny(), tmp_path / "m.xml", "openvino")


def test_drop_aliases_keeps_the_program_s_outputs():
    """Core ML has no alias op: a no-op slice exports as aten.alias and is removed, outputs unchanged."""

    class NoOpCrop(torch.nn.Module):
        def forward(self, x):
            return torch.ops.aten.alias(x * 2) + 1

    x = torch.randn(2, 3, 4, 4)
    program = torch.export.export(NoOpCrop(), (x,)).run_decompositions({})
    assert export.coreml.drop_aliases(program) >= 1
    assert not any("alias" in str(n.target) for n in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), NoOpCrop()(x), rtol=0, atol=0)


def test_verify_names_an_artefact_that_fails_or_changes_shape():
    model = _tiny()
    with pytest.raises(export.ExportError, match=r"failed on input \(1, 3, 32, 32\): RuntimeError: no"):
        export.verify(model, lambda x: (_ for _ in ()).throw(RuntimeError("no")), (3, 32, 32))
    with pytest.raises(export.ExportError, match="differ in number or shape"):
        export.verify(model, lambda x: model(x)[:, :4], (3, 32, 32))


@pytest.mark.slow  # (10 s; the CLI's export path is checked by default through --format export in test_bench)
@_needs("openvino", "openvino")
def test_export_cli_runs_the_openvino_artefact(tmp_path, capsys):
    out = tmp_path / "v.xml"
    args = ["export", "vit_tiny_patch16_224", "--format", "openvino", "--img-size", "32", "--output", str(out)]
    assert cli([*args, "--dynamic-batch"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "ran the openvino artefact in its runtime" in text and "batch 3:" in text


# --- every family, every format (slow: ExecuTorch's lowering takes 1-4 min a model on 2 cores) ---------------

FAMILY_MODELS = [*ONE_PER_FAMILY, "ssdlite_mobilevit_xxs", "deeplabv3_mobilevit_xxs", "mobilevitv2_050"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", EDGE)
@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_every_family_exports_and_verifies(name, fmt, tmp_path):
    model = vitkit.create_model(name).eval()
    # the phone formats as a phone runs them: batch 1, static (Core ML cannot take NesT's, HaloNet's, LaViT's or
    # MobileViTv2's blocks with a dynamic batch; ExecuTorch runs HaloNet and MobileViTv2 only static)
    phone = fmt in ("executorch", "coreml")
    res = export.export_model(model, tmp_path / f"m{export.SUFFIX[fmt]}", fmt, dynamic_batch=not phone)
    assert res["verified"], res


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [*EDGE, pytest.param("onnx", marks=_needs("onnxruntime", "export"))])
def test_mobilevit_takes_its_multi_scale_sizes(fmt, tmp_path):
    """MobileViT's multi-scale sampler trains at several sizes; one artefact takes them all (Core ML: enumerated
    shapes at batch 1)."""
    model = vitkit.create_model("mobilevit_xxs").eval()  # 256 px
    res = export.export_model(model, tmp_path / f"m{export.SUFFIX[fmt]}", fmt, sizes=[192, 320], check_batches=(1,))
    assert res["verified"] and set(res["size_rel_err"]) == {192, 320}, res
    if "coreml" in res:
        assert sorted(res["coreml"]["inputs"][0]["enumerated"]) == [[1, 3, s, s] for s in (192, 256, 320)]


@pytest.mark.slow  # (20 s: trains a small run first)
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="the optional 'export' extra is absent")
def test_export_int8_calibrates_on_the_run_s_own_images(tmp_path, capsys):
    """``vitkit export RUN --format onnx --int8``: a statically quantized model (QuantizeLinear nodes) whose logits
    stay near the fp32 model's. Bound: uint8 activations round each tensor to 1/255 of its range (0.4%), 7-bit
    weights (an AVX2 CPU) each channel to 1/127 (0.8%); over the tiny NesT's ~10 quantized layers that compounds
    to a few percent, so 15% is a loose, honest bound (quantizing every op of this model is off by ~130%: the
    kept set is chosen by measurement)."""
    import onnx

    from serve_helpers import tiny_mnist_run

    run = tiny_mnist_run(tmp_path, images=2048, epochs=3, name="int8-run")  # trained: logits that mean something
    out = tmp_path / "q.onnx"
    assert cli(["export", str(run), "--format", "onnx", "--int8", "--calibration", "128", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    err = float(text.split("training images); max relative error ")[1].split()[0])  # the kept op set's
    assert err < 0.15 and "held-out top-1: fp32" in text and "7-bit weights" in text, text  # portable default
    assert cli(["export", "vit_tiny_patch16_224", "--format", "onnx", "--int8", "--output", str(tmp_path / "x.onnx")])
    assert "--int8 quantizes an ONNX export calibrated on a run's training images" in capsys.readouterr().err
