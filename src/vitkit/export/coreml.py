"""Core ML: an ML program (``.mlpackage``) converted with ``coremltools`` from the ``torch.export`` program.

coremltools converts on Linux, but only macOS can run a Core ML model, so here an export is verified as far as
Linux allows (:func:`inspect_coreml`): the conversion itself (it fails on any op Core ML does not support, and
the converter's message is reported), the saved package's input and output names and shapes, the flexible
input shapes, the compute precision, and the op set of the program. The program handed to coremltools is the
one :func:`vitkit.export.export_model` checks against eager; on macOS :class:`CoreMLRunner` runs the package
and the same numeric check applies.

Export-friendly rewrites, numerically the same (tested with the families' exports): ``aten.alias`` nodes (a
no-op slice such as ``y[:, :H, :W]`` when nothing was padded) are dropped from the program, since Core ML has
no alias op. (HaloNet's windows and the hybrid ViT's weight standardisation were written in ops every
converter takes: see :mod:`vitkit.layers.halo_attention` and :mod:`vitkit.layers.std_conv`.)

Shapes: a static export takes batch 1, what a phone runs (``vitkit export --format coreml`` without
``--dynamic-batch``). With ``sizes``, the input takes the enumerated square sizes at batch 1 (Core ML's
enumerated shapes, which the Neural Engine supports; MobileViT's multi-scale sizes are the use); otherwise a
dynamic batch is a batch range of 1..``max_batch``. Core ML tensors have rank 5 at most: a static batch lets
the converter fold NesT's and MobileViTv2's rank-6 block reshapes, a dynamic batch does not (measured; the
converter's message is in ``benchmarks/edge/README.md``). Optional extra: ``pip install 'vitkit[coreml]'``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
from torch import nn

from vitkit.export.common import ExportSpec, converting, require

MAX_BATCH = 64
RUNS_HERE = sys.platform == "darwin"
WHY_NOT_RUN = "Core ML runs models on macOS only (coremltools on Linux converts and saves but cannot predict)"


def drop_aliases(program: torch.export.ExportedProgram) -> int:
    """Remove ``aten.alias`` nodes (identity views) from ``program`` in place; returns how many."""
    dropped = 0
    for node in list(program.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            program.graph.erase_node(node)
            dropped += 1
    if dropped:
        program.graph_module.recompile()
    return dropped


def coreml_program(model: nn.Module, spec: ExportSpec) -> torch.export.ExportedProgram:
    """The program coremltools converts: ``torch.export``, ATen ops kept (no core-ATen decomposition), aliases
    dropped."""
    program = dataclasses.replace(spec, dynamic_batch=spec.dynamic_batch or bool(spec.sizes)).program(model)
    program = program.run_decompositions({})
    drop_aliases(program)
    return program


def export_coreml(
    model: nn.Module, path: str | os.PathLike, spec: ExportSpec, program: torch.export.ExportedProgram | None = None
) -> Path:
    """Write ``model`` as a Core ML ML program (``.mlpackage``, iOS 17 / macOS 14 and newer). ``program``: its
    :func:`coreml_program`, when the caller already has it (to run it where Core ML cannot run)."""
    ct = require("coremltools", "Core ML export", "coreml")
    c, h, w = spec.chw
    program = coreml_program(model, spec) if program is None else program
    if spec.sizes:
        sides = sorted({int(h), *map(int, spec.sizes)})
        shape = ct.EnumeratedShapes(shapes=[(1, c, s, s) for s in sides], default=(1, c, h, w))
    elif spec.dynamic_batch:
        shape = (ct.RangeDim(1, spec.max_batch, default=1), c, h, w)
    else:
        shape = (1, c, h, w)
    precision = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}[spec.precision]
    with converting(model, "Core ML conversion"):
        converted = ct.convert(
            program,
            inputs=[ct.TensorType(name="x", shape=shape)],
            convert_to="mlprogram",
            compute_precision=precision,
            minimum_deployment_target=ct.target.iOS17,
        )
    converted.save(str(path))
    return Path(path)


def inspect_coreml(path: str | os.PathLike) -> dict:
    """What a saved ``.mlpackage`` declares: inputs (name, shape or enumerated shapes or ranges), outputs, the
    spec version and the ML program's op types (read without the Core ML runtime)."""
    ct = require("coremltools", "Core ML export", "coreml")
    spec = ct.utils.load_spec(str(path))

    def array(feature) -> dict:
        t = feature.type.multiArrayType
        info = {"name": feature.name, "shape": list(t.shape)}
        if t.enumeratedShapes.shapes:
            info["enumerated"] = [list(s.shape) for s in t.enumeratedShapes.shapes]
        if t.shapeRange.sizeRanges:
            info["ranges"] = [(r.lowerBound, r.upperBound) for r in t.shapeRange.sizeRanges]
        info["dtype"] = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(t.dataType)
        return info

    ops = set()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            ops.update(op.type for op in block.operations)
    return {
        "inputs": [array(f) for f in spec.description.input],
        "outputs": [array(f) for f in spec.description.output],
        "spec_version": spec.specificationVersion,
        "ops": sorted(ops),
    }


class CoreMLRunner:
    """A ``.mlpackage`` as a callable on torch tensors, through Core ML (macOS only)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        if not RUNS_HERE:
            raise RuntimeError(WHY_NOT_RUN)
        ct = require("coremltools", "Core ML export", "coreml")
        self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
        self.outputs = [o.name for o in self.model.get_spec().description.output]

    def __call__(self, x: torch.Tensor):
        result = self.model.predict({"x": x.detach().float().numpy()})
        outs = [torch.from_numpy(result[name]) for name in self.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)
