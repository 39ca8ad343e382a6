"""What every export format shares: the exported module (a detector's raw head), the error type, and the
``torch.export`` program that the ONNX, ExecuTorch, Core ML and OpenVINO exporters all start from."""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

MAX_BATCH = 1024


class ExportError(RuntimeError):
    """A model that cannot be exported in the requested format (the message carries the converter's reason)."""


class MissingExtra(ImportError):
    """An optional converter or runtime that is not installed: ``pip install 'vitkit[<extra>]'``."""

    def __init__(self, what: str, extra: str):
        super().__init__(f"{what} needs the optional '{extra}' extra: pip install 'vitkit[{extra}]'")
        self.extra = extra


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


def outputs(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def model_name(model: nn.Module) -> str:
    return getattr(model, "model_name", None) or getattr(model, "name", None) or type(model).__name__


def size_range(chw: Sequence[int], sizes: Sequence[int] | None) -> tuple[int, int, int] | None:
    """``(step, lo, hi)`` for the flexible square sizes an artefact must accept: every multiple of ``step`` (the
    greatest common divisor of the default and the requested sizes) from ``lo`` to ``hi``; None: fixed size."""
    if not sizes:
        return None
    if any(int(s) <= 0 for s in sizes):
        raise ValueError(f"input sizes must be positive, got {list(sizes)}")
    if chw[1] != chw[2]:
        raise ValueError(f"flexible input sizes are square sizes; the model's input is {chw[1]}x{chw[2]}")
    every = [int(chw[1]), *map(int, sizes)]
    return math.gcd(*every), min(every), max(every)


def dynamic_shapes(
    dynamic_batch: bool, chw: Sequence[int], sizes: Sequence[int] | None = None, max_batch: int = MAX_BATCH
):
    """``torch.export`` dynamic shapes for the input ``x``: a batch of 1..``max_batch`` and, with ``sizes``, a
    square side that is any multiple of the sizes' common step between the smallest and the largest."""
    dims = {}
    if dynamic_batch:  # traced at batch 2 (exporters specialise a dimension they see as 1)
        dims[0] = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    flexible = size_range(chw, sizes)
    if flexible:
        step, lo, hi = flexible
        side = step * torch.export.Dim("side", min=lo // step, max=hi // step)
        dims[2] = dims[3] = side
    return {"x": dims} if dims else None


def example(chw: Sequence[int], batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *chw, generator=torch.Generator().manual_seed(0))


def trace_input(chw: Sequence[int], sizes: Sequence[int] | None = None, batch: int = 2) -> torch.Tensor:
    """The input an export traces: ``batch`` (the exporter fixes a dimension whose traced size is 0 or 1, so a
    dynamic batch is traced at 2), and with flexible ``sizes`` the largest side (where it is the most multiples
    of its step)."""
    flexible = size_range(chw, sizes)
    return example(chw if not flexible else (chw[0], flexible[2], flexible[2]), batch)


def torch_program(
    model: nn.Module,
    chw: Sequence[int],
    dynamic_batch: bool = True,
    sizes: Sequence[int] | None = None,
    max_batch: int = MAX_BATCH,
) -> torch.export.ExportedProgram:
    """The ``torch.export`` program of ``exportable(model)`` in eval mode, traced at batch 2 when the batch is
    dynamic and at batch 1 when it is not (what a phone runs); :class:`ExportError` with the reason."""
    model = exportable(model).eval()
    shapes = dynamic_shapes(dynamic_batch, chw, sizes, max_batch)
    x = trace_input(chw, sizes, 2 if dynamic_batch else 1)
    with converting(model, "torch.export"):
        return torch.export.export(model, (x,), dynamic_shapes=shapes)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|``: the error measure every verified route and export uses."""
    ref = ref.float()
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@dataclass(frozen=True)
class ExportSpec:
    """What an artefact must accept: inputs of ``chw``, a batch of 1..``max_batch`` (or batch 1 when the batch is
    static), the square ``sizes`` besides the default, computed at ``precision``."""

    chw: tuple[int, ...]
    dynamic_batch: bool = True
    sizes: tuple[int, ...] | None = None
    max_batch: int = MAX_BATCH
    precision: str = "fp32"

    def program(self, model: nn.Module) -> torch.export.ExportedProgram:
        return torch_program(model, self.chw, self.dynamic_batch, self.sizes, self.max_batch)


def require(module: str, what: str, extra: str):
    """Import an optional converter or runtime, or raise :class:`MissingExtra` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(what, extra) from None


@contextlib.contextmanager
def converting(model: nn.Module, what: str) -> Iterator[None]:
    """A converter's own exceptions (many types) as one :class:`ExportError` naming the model and the step."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{model_name(model)}: {what} failed: {type(e).__name__}: {str(e)[:500]}") from e
