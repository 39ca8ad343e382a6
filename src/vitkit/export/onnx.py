"""ONNX: the dynamo exporter, ONNX Runtime to run it, and ONNX Runtime's static int8 quantizer."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vitkit.export.common import converting, dynamic_shapes, exportable, rel_err, require, trace_input
from vitkit.machine import int8_dot_units


def export_onnx(
    model: nn.Module, path: str | os.PathLike, input_chw, dynamic_batch: bool = True, sizes: Sequence[int] | None = None
) -> Path:
    """Write ``model`` as ONNX (opset of the dynamo exporter) with an optional dynamic batch axis and, with
    ``sizes``, a flexible square input side."""
    model = exportable(model)
    with converting(model, "ONNX export"):
        program = torch.onnx.export(
            model.eval(),
            (trace_input(input_chw, sizes, 2 if dynamic_batch else 1),),
            dynamo=True,
            dynamic_shapes=dynamic_shapes(dynamic_batch, input_chw, sizes),
            verbose=False,
        )
        program.save(str(path))
    return Path(path)


class OnnxRunner:
    """An ONNX file as a callable on torch tensors (ONNX Runtime's CPU provider, ``threads`` intra-op threads).
    ``graph_optimizations=False`` runs the graph as written (no fusions: a quantized graph's QuantizeLinear and
    DequantizeLinear then run as float ops, without ONNX Runtime's int8 kernels)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, graph_optimizations: bool = True):
        ort = require("onnxruntime", "running an ONNX export (onnxruntime)", "export")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        if not graph_optimizations:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor):
        outs = [torch.from_numpy(o) for o in self.session.run(None, {self.input: x.detach().float().numpy()})]
        return outs[0] if len(outs) == 1 else tuple(outs)


@contextlib.contextmanager
def _working_directory(path):  # contextlib.chdir, which Python 3.10 lacks
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def preprocess_for_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """ONNX Runtime's pre-processing before quantization (``quant_pre_process``: shape inference and its
    optimizer), as its documentation advises. Where ONNX Runtime's symbolic shape inference fails on a graph
    (onnxruntime 1.30 does on ViT's and HaloNet's exports: an IndexError in its Concat rule, "Incomplete symbolic
    shape inference"; 1.32 does not) it is redone with ONNX's own shape inference (``skip_symbolic_shape``), with a
    warning. Runs in a scratch working folder: the failing inference leaves its temporary model (for ViT-S a 50 MB
    external-data file) in the current directory. Returns ``dst``."""
    require("onnxruntime", "int8 quantization (onnxruntime)", "export")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    with tempfile.TemporaryDirectory(prefix="vitkit-quant-") as scratch, _working_directory(scratch):
        try:
            quant_pre_process(str(src), str(dst))
        except Exception as e:  # noqa: BLE001 - a pre-processing bug, not the model's: redo it without that step
            warnings.warn(f"ONNX Runtime's pre-processing failed ({type(e).__name__}: {e}); redone without its "
                          "symbolic shape inference (ONNX's shape inference only)", stacklevel=3)  # fmt: skip
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def quantize_onnx_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calibration,
    op_types: Sequence[str] | None = None,
    reduce_range: bool | None = None,
) -> Path:
    """Static int8 quantization of an ONNX model with ONNX Runtime's quantizer (``onnxruntime.quantization``).

    QDQ format, weights int8 per output channel, activations uint8 per tensor (asymmetric ranges, MinMax
    calibration on ``calibration``: an iterable of input batches), ONNX Runtime's fast u8 x s8 kernels. On an x86
    CPU without VNNI/AMX (:func:`vitkit.machine.int8_dot_units` false) the weights are quantized to 7 bits
    (``reduce_range``), as ONNX Runtime's documentation advises: those CPUs multiply with ``vpmaddubsw``, whose
    16-bit pairwise sums saturate with full 8-bit weights. Measured on MobileViT-XXS trained on MNIST digits (AMD
    EPYC, AVX2): held-out top-1 98.6% fp32, 88.7% u8 x s8 with 8-bit weights (the saturation), 98.8% with 7-bit
    weights, 98.4% with symmetric s8 activations (accurate but ONNX Runtime's slow path here: 2.2x the time).
    The graph is pre-processed first (:func:`preprocess_for_int8`). PyTorch's own PT2E flow is the other int8
    backend (:func:`vitkit.routes.quantize_pt2e_int8`); ``optimize(route="int8")`` compares the two.

    ``op_types``: the ONNX op types to quantize (None: every op ONNX Runtime can, its default). Which set keeps a
    model accurate depends on the model: on a small NesT trained on MNIST digits, quantizing every op put the
    logits 134% off (relative), Conv + MatMul + Gemm 21%, MatMul + Gemm 2%; ``vitkit export --int8`` therefore
    tries these sets and keeps the most accurate on images it did not calibrate on. ``reduce_range``: None
    decides by this CPU as above (right for a model quantized where it runs, as ``optimize(route="int8")`` does);
    a file meant for other machines should pass True unless every one of them has VNNI/AMX: 8-bit weights
    quantized on a VNNI host saturate on an AVX2-only one (``vitkit export --int8`` defaults to 7 bits).
    """
    require("onnxruntime", "int8 quantization (onnxruntime)", "export")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"x": x.numpy().astype("float32")}

    src, dst = Path(src).resolve(), Path(dst).resolve()
    pre = preprocess_for_int8(src, dst.with_suffix(".pre.onnx"))
    try:
        quantize_static(
            str(pre), str(dst), _Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
            reduce_range=not int8_dot_units() if reduce_range is None else reduce_range,
            op_types_to_quantize=list(op_types) if op_types else None,
        )  # fmt: skip
    finally:
        pre.unlink(missing_ok=True)
    return dst


INT8_OP_SETS = (None, ("Conv", "MatMul", "Gemm"), ("MatMul", "Gemm"))  # None: every op ONNX Runtime quantizes


def quantize_onnx_int8_best(
    model: nn.Module,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calibration,
    check,
    op_sets=INT8_OP_SETS,
    reduce_range: bool | None = None,
) -> dict:
    """:func:`quantize_onnx_int8` with each of ``op_sets``; the one whose outputs are nearest ``model``'s on the
    ``check`` batches (inputs it was not calibrated on) is written to ``dst``. Returns ``{"label", "op_types",
    "errors": {label: max relative error}, "max_rel_err"}``. Used by ``vitkit export --int8`` and
    ``optimize(route="int8")``: which ops survive quantization depends on the model (see
    :func:`quantize_onnx_int8`). ``reduce_range`` as there (None: by this CPU)."""
    import shutil

    errors, best = {}, None
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        refs = [model(x) for x in check]  # eager once, compared with every candidate
        for i, ops in enumerate(op_sets):
            path = quantize_onnx_int8(src, Path(tmp) / f"{i}.onnx", calibration, ops, reduce_range)
            runner = OnnxRunner(path)
            label = "+".join(ops) if ops else "every op"
            errors[label] = max(rel_err(runner(x), ref) for x, ref in zip(check, refs))
            if best is None or errors[label] < errors[best[0]]:
                best = (label, ops, path)
        shutil.copyfile(best[2], dst)
    return {"label": best[0], "op_types": best[1], "errors": errors, "max_rel_err": errors[best[0]]}
