"""Export a model for deployment, and verify the artefact against the eager model.

Formats (``FORMATS``): ``onnx`` (dynamo exporter, run with ONNX Runtime), ``export`` (a ``torch.export`` program,
.pt2), ``torchscript`` (deprecated with ``torch.jit.trace``), ``executorch`` (a .pte program delegated to
XNNPACK, run with ExecuTorch's runtime), ``openvino`` (IR, run with OpenVINO's CPU plugin) and ``coreml``
(an ML program .mlpackage; converted here, run only on macOS). The converters are optional extras
(``vitkit[export]``, ``[executorch]``, ``[openvino]``, ``[coreml]``); a missing one raises
:class:`MissingExtra` naming the extra.

Every format goes through one verification, :func:`verify`: the artefact is loaded in its own runtime and run
on seeded random inputs at several batch sizes and, for flexible-size exports, several input sizes, and each
output is compared with the eager model's (``max |artefact - eager| / max |eager|``; 1e-4 for fp32, 1e-2 for an
fp16 artefact). Where the runtime cannot run on this machine (Core ML off macOS) the program handed to the
converter is what is run, and the result says so. A model that cannot be exported raises :class:`ExportError`
naming the model, the format and the converter's reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vitkit.export import coreml as _coreml
from vitkit.export import executorch as _et
from vitkit.export.common import (
    MAX_BATCH,
    ExportError,
    ExportSpec,
    MissingExtra,
    RawHead,
    example,
    exportable,
    outputs,
    rel_err,
    torch_program,
)
from vitkit.export.coreml import export_coreml, inspect_coreml
from vitkit.export.executorch import ExecuTorchRunner, export_executorch
from vitkit.export.onnx import (
    INT8_OP_SETS,
    OnnxRunner,
    export_onnx,
    preprocess_for_int8,
    quantize_onnx_int8,
    quantize_onnx_int8_best,
)
from vitkit.export.openvino import OpenVinoRunner, export_openvino
from vitkit.export.torchscript import export_program, export_torchscript, onednn_graph_fusion, trace_frozen

__all__ = [
    "FORMATS", "SUFFIX", "TOLERANCE", "ExportError", "ExportSpec", "MissingExtra", "RawHead", "exportable",
    "export_model", "load", "run_exported", "export_onnx", "export_program", "export_torchscript", "export_executorch",
    "export_openvino", "export_coreml", "inspect_coreml", "quantize_onnx_int8", "quantize_onnx_int8_best",
    "preprocess_for_int8",
    "INT8_OP_SETS", "OnnxRunner", "ExecuTorchRunner", "OpenVinoRunner", "trace_frozen", "onednn_graph_fusion",
    "rel_err", "torch_program", "verify",
]  # fmt: skip

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # relative, per artefact precision


@dataclass(frozen=True)
class Format:
    """One export format: how to write it, how to run it here, what it can hold."""

    name: str
    suffix: str
    write: Callable[[nn.Module, Path, ExportSpec], Path]
    runner: Callable[..., Callable] | None  # (path, threads) -> callable on a tensor
    extra: str | None = None
    precisions: tuple[str, ...] = ("fp32",)
    flexible_sizes: bool = True  # accepts ``sizes`` (a flexible square input side)
    max_batch: int = MAX_BATCH


def _onnx(model, path, spec: ExportSpec) -> Path:
    return export_onnx(model, path, spec.chw, spec.dynamic_batch, spec.sizes)


def _program(model, path, spec: ExportSpec) -> Path:
    return export_program(model, path, spec.chw, spec.dynamic_batch, spec.sizes)


def _torchscript(model, path, spec: ExportSpec) -> Path:
    return export_torchscript(model, path, spec.chw)


def _program_runner(path, threads=None):
    return torch.export.load(str(path)).module()


def _torchscript_runner(path, threads=None):
    return torch.jit.load(str(path))


REGISTRY: dict[str, Format] = {
    f.name: f
    for f in (
        Format("onnx", ".onnx", _onnx, OnnxRunner, extra="export"),
        Format("export", ".pt2", _program, _program_runner),
        Format("torchscript", ".torchscript.pt", _torchscript, _torchscript_runner, flexible_sizes=False),
        Format("executorch", ".pte", export_executorch, ExecuTorchRunner, extra="executorch", max_batch=_et.MAX_BATCH),
        Format("openvino", ".xml", export_openvino, OpenVinoRunner, extra="openvino", precisions=("fp32", "fp16")),
        Format(
            "coreml",
            ".mlpackage",
            export_coreml,
            _coreml.CoreMLRunner if _coreml.RUNS_HERE else None,
            extra="coreml",
            precisions=("fp32", "fp16"),
            max_batch=_coreml.MAX_BATCH,
        ),  # fmt: skip
    )
}
FORMATS = tuple(REGISTRY)
SUFFIX = {name: f.suffix for name, f in REGISTRY.items()}


def get_format(fmt: str) -> Format:
    if fmt not in REGISTRY:
        raise ValueError(f"export format must be one of {FORMATS}, got {fmt!r}")
    return REGISTRY[fmt]


def load(path: str | os.PathLike, fmt: str, threads: int | None = None) -> Callable:
    """An exported artefact as a callable on input tensors, in its own runtime (RuntimeError where the format's
    runtime cannot run on this machine)."""
    f = get_format(fmt)
    if f.runner is None:
        raise RuntimeError(f"{fmt}: {_coreml.WHY_NOT_RUN}")
    return f.runner(path, threads)


def run_exported(path: str | os.PathLike, fmt: str, x: torch.Tensor):
    """Run an exported artefact on ``x``: its output, or a tuple of several."""
    return load(path, fmt)(x)


def verify(
    model: nn.Module,
    runner: Callable,
    chw: Sequence[int],
    batches: Sequence[int] = (1, 3),
    sizes: Sequence[int] = (),
) -> dict:
    """Run ``runner`` and the eager model on the same seeded inputs: each batch size at the model's input size,
    then batch 1 at each other square size. Returns ``{"max_abs_diff": {batch: d}, "max_rel_err": {batch: e},
    "size_rel_err": {side: e}}``; different output counts or shapes raise ``ExportError``."""
    reference = exportable(model).eval()
    res = {"max_abs_diff": {}, "max_rel_err": {}, "size_rel_err": {}}
    checks = [(b, int(chw[1])) for b in batches] + [(1, int(s)) for s in sizes if int(s) != int(chw[1])]
    for b, side in checks:
        x = example((chw[0], side, side) if side != chw[1] else chw, b)
        with torch.no_grad():
            refs = outputs(reference(x))
            try:
                outs = outputs(runner(x))
            except Exception as e:  # noqa: BLE001 - each runtime raises its own types
                raise ExportError(f"the artefact failed on input {tuple(x.shape)}: {type(e).__name__}: {e}") from e
        if [tuple(o.shape) for o in outs] != [tuple(r.shape) for r in refs]:
            raise ExportError(
                f"the artefact's outputs {[tuple(o.shape) for o in outs]} differ in number or shape from the "
                f"eager model's {[tuple(r.shape) for r in refs]} (input {tuple(x.shape)})"
            )
        err = max(rel_err(o, r) for o, r in zip(outs, refs))
        if side == int(chw[1]):
            res["max_abs_diff"][b] = max(float((o.float() - r.float()).abs().max()) for o, r in zip(outs, refs))
            res["max_rel_err"][b] = err
        else:
            res["size_rel_err"][side] = err
    return res


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    fmt: str,
    dynamic_batch: bool = True,
    check_batches: Sequence[int] = (1, 3),
    sizes: Sequence[int] | None = None,
    precision: str = "fp32",
    max_batch: int | None = None,
    input_chw: Sequence[int] | None = None,
) -> dict:
    """Export ``model`` and verify the artefact (:func:`verify`). Returns ``{"path", "format", "precision",
    "max_abs_diff", "max_rel_err", "size_rel_err", "tolerance", "verified", "ran"}``: ``ran`` names what was run
    (the artefact in its runtime, or for Core ML off macOS the program given to the converter), ``verified``
    whether every error is within the precision's tolerance. Core ML results also carry ``coreml``:
    :func:`inspect_coreml` of the saved package."""
    f = get_format(fmt)
    if precision not in f.precisions:
        raise ValueError(f"{fmt} exports {' or '.join(f.precisions)}, not {precision!r}")
    if sizes and not f.flexible_sizes:
        raise ValueError(f"{fmt} exports one input size; flexible sizes need another format")
    chw = tuple(input_chw or model.pretrained_cfg["input_size"])
    max_batch = max_batch or f.max_batch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = ExportSpec(chw, dynamic_batch, tuple(sizes) if sizes else None, max_batch, precision)
    if f.runner is None:  # Core ML off macOS: the program it converts is what can be run here, so keep it
        program = _coreml.coreml_program(model, spec)
        _coreml.export_coreml(model, path, spec, program)
    else:
        f.write(model, path, spec)
    if not dynamic_batch and fmt != "torchscript":  # a static export is batch 1 (a trace keeps the batch free)
        check_batches = (1,)
    check_batches = [b for b in check_batches if b <= max_batch]
    extra = {}
    if f.runner is not None:
        runner, ran = load(path, fmt), f"the {fmt} artefact in its runtime"
    else:  # Core ML off macOS: the converted program's declared shapes, and the program it was converted from
        extra["coreml"] = inspect_coreml(path)
        runner, ran = program.module(), f"the program given to the converter ({_coreml.WHY_NOT_RUN})"
        if sizes:
            check_batches = [1]  # enumerated sizes are at batch 1
    res = verify(model, runner, chw, check_batches, sizes or ())
    tol = TOLERANCE[precision]
    errors = [*res["max_rel_err"].values(), *res["size_rel_err"].values()]
    return {
        "path": str(path),
        "format": fmt,
        "precision": precision,
        **res,
        "tolerance": tol,
        "verified": all(e <= tol for e in errors),
        "ran": ran,
        **extra,
    }
