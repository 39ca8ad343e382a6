"""ExecuTorch: a ``.pte`` program lowered to the XNNPACK delegate, and ExecuTorch's own runtime to run it.

The program starts from the same ``torch.export`` program as the other exporters; ``executorch.exir`` lowers
every partition XNNPACK supports (convolutions, linear layers, attention's matmuls, elementwise ops) and the
rest runs on ExecuTorch's portable kernels. ExecuTorch plans all activation memory ahead for the largest input
the program accepts, so its dynamic batch stops at ``max_batch`` (default 8) rather than the 1024 of the ONNX
and ``torch.export`` artefacts. A static export (``dynamic_batch=False``) is batch 1, what a phone runs; with
ExecuTorch 1.5.1 it is also the form that runs HaloNet and MobileViTv2 (their dynamic-batch programs fail at
batch 1 with error 0x10 in XNNPACK). Optional extra: ``pip install 'vitkit[executorch]'``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vitkit.export.common import ExportError, MissingExtra, model_name, torch_program

MAX_BATCH = 8


def export_executorch(
    model: nn.Module,
    path: str | os.PathLike,
    input_chw,
    dynamic_batch: bool = True,
    sizes: Sequence[int] | None = None,
    max_batch: int = MAX_BATCH,
    precision: str = "fp32",
) -> Path:
    """Write ``model`` as an ExecuTorch program (``.pte``) delegated to XNNPACK (fp32)."""
    if precision != "fp32":
        raise ValueError(f"the ExecuTorch export is fp32, not {precision!r}")
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise MissingExtra("ExecuTorch export", "executorch") from None
    program = torch_program(model, input_chw, dynamic_batch, sizes, max_batch)
    try:
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as e:  # noqa: BLE001 - the lowering raises many types; report them as one
        raise ExportError(f"{model_name(model)}: ExecuTorch lowering failed: {type(e).__name__}: {str(e)[:500]}") from e
    Path(path).write_bytes(lowered.buffer)
    return Path(path)


class ExecuTorchRunner:
    """A ``.pte`` program as a callable on torch tensors, run by ExecuTorch's runtime (``executorch.runtime``);
    ``threads`` sizes the runtime's thread pool (XNNPACK's), which is process-wide."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        try:
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime
        except ImportError:
            raise MissingExtra("running an ExecuTorch program", "executorch") from None
        portable_lib._unsafe_reset_threadpool(threads or torch.get_num_threads())  # the runtime's only knob
        self.method = Runtime.get().load_program(Path(path)).load_method("forward")

    def __call__(self, x: torch.Tensor):
        outs = self.method.execute([x.detach().float().contiguous()])
        return outs[0] if len(outs) == 1 else tuple(outs)
