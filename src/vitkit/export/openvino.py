"""OpenVINO: an IR (``.xml`` + ``.bin``) converted from the ``torch.export`` program with OpenVINO's PyTorch
frontend (``openvino.convert_model``), run with OpenVINO's CPU plugin. Optional extra: ``vitkit[openvino]``.

Two defaults of OpenVINO would change the numbers silently, so both are explicit here: ``save_model`` stores
weights as fp16 unless told not to (measured: 6e-4 relative error on ViT-Ti instead of 1e-6), so an fp32
export keeps fp32 weights (``precision="fp16"`` asks for the compressed ones); and the CPU plugin computes in
bf16 on CPUs with AMX or AVX-512 bf16 unless ``INFERENCE_PRECISION_HINT`` says f32, which the runner sets.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from vitkit.export.common import ExportSpec, converting, require


def export_openvino(model: nn.Module, path: str | os.PathLike, spec: ExportSpec) -> Path:
    """Write ``model`` as OpenVINO IR at ``path`` (``.xml``; the weights go beside it in ``.bin``)."""
    ov = require("openvino", "OpenVINO export and runtime", "openvino")
    program = spec.program(model)
    with converting(model, "OpenVINO conversion"):
        converted = ov.convert_model(program)
    ov.save_model(converted, str(path), compress_to_fp16=spec.precision == "fp16")
    return Path(path)


class OpenVinoRunner:
    """An OpenVINO IR as a callable on torch tensors (CPU plugin, f32 inference precision, ``threads`` threads)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        ov = require("openvino", "OpenVINO export and runtime", "openvino")
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor):
        result = self.request.infer([x.detach().float().contiguous().numpy()])
        outs = [torch.from_numpy(result[o].copy()) for o in self.compiled.outputs]  # (the request reuses buffers)
        return outs[0] if len(outs) == 1 else tuple(outs)
