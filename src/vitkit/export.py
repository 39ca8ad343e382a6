"""Export a model for deployment: ONNX (dynamo exporter), ``torch.export`` programs (.pt2), TorchScript.

Every export is checked before it is reported as done: the exported artefact is run on the same input as
the eager model and the largest absolute difference is returned (ONNX through onnxruntime when the
optional ``export`` extra is installed). A model that cannot be exported in a format raises
:class:`ExportError` naming the model, the format and the exporter's reason.

:func:`trace_frozen` and :func:`onednn_graph_fusion` are the TorchScript inference runtime that
``vitkit bench --runtime torchscript`` measures.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

FORMATS = ("onnx", "export", "torchscript")
SUFFIX = {"onnx": ".onnx", "export": ".pt2", "torchscript": ".torchscript.pt"}


class ExportError(RuntimeError):
    """A model that cannot be exported in the requested format."""


class RawHead(nn.Module):
    """A detector's exportable part, ``model.forward_raw``: (class logits, box deltas) over all anchors. Decoding
    and NMS follow on the outputs with ``model.postprocess`` (see :mod:`vitkit.tasks.detection.models`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.model_name = getattr(model, "model_name", type(model).__name__)
        self.training = model.training  # the wrapper's own flag only: .train() would reset the model's submodules

    def forward(self, x: torch.Tensor):
        return self.model.forward_raw(x)


def exportable(model: nn.Module) -> nn.Module:
    """What an export holds: the model, or a detector's raw head (everything up to, not including, NMS)."""
    return RawHead(model) if hasattr(model, "forward_raw") else model


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _name(model: nn.Module) -> str:
    return getattr(model, "model_name", type(model).__name__)


def _batch_dim(dynamic_batch: bool):
    # traced at batch 2 (exporters specialise a dimension they see as 1); batches 1..1024 then run
    return {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic_batch else None


def export_onnx(model: nn.Module, path: str | os.PathLike, input_chw, dynamic_batch: bool = True) -> Path:
    """Write ``model`` as ONNX (opset of the dynamo exporter) with an optional dynamic batch axis."""
    x = torch.randn(2, *input_chw)
    model = exportable(model)
    try:
        program = torch.onnx.export(
            model.eval(), (x,), dynamo=True, dynamic_shapes=_batch_dim(dynamic_batch), verbose=False
        )
        program.save(str(path))
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; report them as one
        raise ExportError(f"{_name(model)}: ONNX export failed: {type(e).__name__}: {str(e)[:500]}") from e
    return Path(path)


def export_program(model: nn.Module, path: str | os.PathLike, input_chw, dynamic_batch: bool = True) -> Path:
    """Write a ``torch.export`` ExportedProgram (.pt2); load it with ``torch.export.load``."""
    x = torch.randn(2, *input_chw)
    model = exportable(model)
    try:
        ep = torch.export.export(model.eval(), (x,), dynamic_shapes=_batch_dim(dynamic_batch))
        torch.export.save(ep, str(path))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{_name(model)}: torch.export failed: {type(e).__name__}: {str(e)[:500]}") from e
    return Path(path)


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_chw) -> Path:
    """Write a traced TorchScript module (batch size is free in the trace; the input size is fixed)."""
    x = torch.randn(2, *input_chw)
    model = exportable(model)
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model.eval(), (x,), check_trace=False)
        traced.save(str(path))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{_name(model)}: TorchScript tracing failed: {type(e).__name__}: {str(e)[:500]}") from e
    return Path(path)


@contextlib.contextmanager
def onednn_graph_fusion(enabled: bool = True) -> Iterator[None]:
    """TorchScript's oneDNN Graph fuser on (or off) inside the block; the process-wide flag is restored after.

    The fuser compiles a frozen graph's linear/conv layers with their epilogues (bias, GELU, residual add) and
    pools into cached oneDNN partitions with pre-packed weights, while the profiling executor warms the module
    up; keep the calls that should use it inside the block.
    """
    previous = torch._C._jit_llga_enabled()
    torch.jit.enable_onednn_fusion(enabled)
    try:
        yield
    finally:
        torch.jit.enable_onednn_fusion(previous)


def trace_frozen(model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    """The TorchScript inference runtime: ``model`` traced on ``x`` and frozen (weights become constants,
    BatchNorm folds into the convolutions). The trace follows ``x``'s input size and the code paths it took;
    raises :class:`ExportError` with the tracer's reason when the model cannot be traced."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # sizes baked into the trace: documented above
            return torch.jit.freeze(torch.jit.trace(model.eval(), (x,), check_trace=False))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{_name(model)}: TorchScript tracing failed: {type(e).__name__}: {str(e)[:500]}") from e


def run_exported(path: str | os.PathLike, fmt: str, x: torch.Tensor):
    """Run an exported artefact on ``x`` (ONNX through onnxruntime): its output, or a tuple of several."""
    if fmt == "onnx":
        return OnnxRunner(path)(x)
    if fmt == "export":
        return torch.export.load(str(path)).module()(x)
    return torch.jit.load(str(path))(x)


def quantize_onnx_int8(src: str | os.PathLike, dst: str | os.PathLike, calibration) -> Path:
    """Static int8 quantization of an ONNX model with ONNX Runtime's quantizer (``onnxruntime.quantization``).

    QDQ format, weights int8 per output channel, activations int8 per tensor with symmetric ranges calibrated
    (MinMax) on ``calibration``: an iterable of input batches (tensors). Symmetric activations, because ONNX
    Runtime's default (asymmetric uint8) cost MobileViT-XXS trained on MNIST digits 10 points of held-out top-1
    (98.6% -> 88.7%; MinMax, percentile and entropy calibration alike) where symmetric int8 cost 0.2 (98.4%).
    The graph is pre-processed (shape inference, ONNX Runtime's optimizer) first, as ONNX Runtime's documentation
    advises. PyTorch's own PT2E flow (``torchao.quantization.pt2e`` with the x86 Inductor quantizer) was tried
    first and is not used: with torch 2.13.0 and torchao 0.18.0 Inductor's freezing pass fails on
    ``onednn.qconv_prepack`` (UnsupportedOperatorException), and without freezing the int8 program took 285 s
    to compile.
    """
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ImportError("int8 quantization needs onnxruntime: pip install 'vitkit[export]'") from None

    class _Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"x": x.numpy().astype("float32")}

    src, dst = Path(src), Path(dst)
    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre))
    try:
        quantize_static(
            str(pre), str(dst), _Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
            weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": True},
        )  # fmt: skip
    finally:
        pre.unlink(missing_ok=True)
    return dst


class OnnxRunner:
    """An ONNX file as a callable on torch tensors (ONNX Runtime's CPU provider, ``threads`` intra-op threads)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("running an ONNX export needs onnxruntime: pip install 'vitkit[export]'") from None

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor):
        outs = [torch.from_numpy(o) for o in self.session.run(None, {self.input: x.detach().float().numpy()})]
        return outs[0] if len(outs) == 1 else tuple(outs)


def export_model(
    model: nn.Module, path: str | os.PathLike, fmt: str, dynamic_batch: bool = True, check_batches=(1, 3)
) -> dict:
    """Export and verify: returns ``{"path", "format", "max_abs_diff": {batch: diff}}``."""
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {fmt!r}")
    chw = tuple(model.pretrained_cfg["input_size"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        export_onnx(model, path, chw, dynamic_batch)
    elif fmt == "export":
        export_program(model, path, chw, dynamic_batch)
    else:
        export_torchscript(model, path, chw)
    diffs = {}
    for b in check_batches if dynamic_batch or fmt == "torchscript" else (2,):
        x = torch.randn(b, *chw)
        with torch.no_grad():
            refs = _outputs(exportable(model).eval()(x))
            outs = _outputs(run_exported(path, fmt, x))
        diffs[b] = max(float((o.float() - r.float()).abs().max()) for o, r in zip(outs, refs))
    return {"path": str(path), "format": fmt, "max_abs_diff": diffs}
