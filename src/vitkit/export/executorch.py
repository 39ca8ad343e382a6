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
from pathlib import Path

import torch
from torch import nn

from vitkit.export.common import ExportSpec, converting, require

MAX_BATCH = 8


def export_executorch(model: nn.Module, path: str | os.PathLike, spec: ExportSpec) -> Path:
    """Write ``model`` as an ExecuTorch program (``.pte``) delegated to XNNPACK (fp32)."""
    require("executorch", "ExecuTorch export", "executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = spec.program(model)
    with converting(model, "ExecuTorch lowering"):
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    Path(path).write_bytes(lowered.buffer)
    return Path(path)


class ExecuTorchRunner:
    """A ``.pte`` program as a callable on torch tensors, run by ExecuTorch's runtime (``executorch.runtime``);
    ``threads`` sizes the runtime's thread pool (XNNPACK's), which is process-wide."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        require("executorch", "running an ExecuTorch program", "executorch")
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        portable_lib._unsafe_reset_threadpool(threads or torch.get_num_threads())  # the runtime's only knob
        self.method = Runtime.get().load_program(Path(path)).load_method("forward")

    def __call__(self, x: torch.Tensor):
        outs = self.method.execute([x.detach().float().contiguous()])
        return outs[0] if len(outs) == 1 else tuple(outs)
