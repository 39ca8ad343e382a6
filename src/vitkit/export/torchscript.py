"""``torch.export`` programs (.pt2) and the deprecated TorchScript trace, with the TorchScript inference runtime
(:func:`trace_frozen`, :func:`onednn_graph_fusion`) that ``vitkit bench --runtime torchscript`` measures."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from vitkit.export.common import converting, example, exportable, torch_program


def export_program(
    model: nn.Module, path: str | os.PathLike, input_chw, dynamic_batch: bool = True, sizes: Sequence[int] | None = None
) -> Path:
    """Write a ``torch.export`` ExportedProgram (.pt2); load it with ``torch.export.load``."""
    torch.export.save(torch_program(model, input_chw, dynamic_batch, sizes), str(path))
    return Path(path)


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_chw) -> Path:
    """Write a traced TorchScript module (batch size is free in the trace; the input size is fixed)."""
    model = exportable(model)
    with converting(model, "TorchScript tracing"), torch.no_grad():
        torch.jit.trace(model.eval(), (example(input_chw),), check_trace=False).save(str(path))
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
    with converting(model, "TorchScript tracing"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # sizes baked into the trace: documented above
        return torch.jit.freeze(torch.jit.trace(model.eval(), (x,), check_trace=False))
