"""Inference routes (eager, compiled, int8) and :func:`optimize`, the fastest verified one on this machine.

The layers in :mod:`vitkit.layers` are plain reference code; speed at inference comes from here:

* ``"compile"``: ``torch.compile`` (Inductor) with freezing (weights folded into the graph as constants, which
  lets Inductor pre-pack them and fold BatchNorm), its output checked against eager before it is returned
  (``rtol`` relative to the largest eager output: 1e-4 in fp32, 5e-2 in bf16). Inductor's on-disk caches live
  in ``$XDG_CACHE_HOME/vitkit/inductor`` (``~/.cache`` by default; ``TORCHINDUCTOR_CACHE_DIR`` overrides), so a
  second process compiling the same model at the same shapes reuses the first one's kernels.
* ``"int8"``: post-training static quantization of the ONNX export with ONNX Runtime's quantizer, calibrated on
  the batches given (all but the last, which chooses the quantized op set among ``vitkit.export.INT8_OP_SETS``),
  run by ONNX Runtime (:func:`vitkit.export.quantize_onnx_int8` says why not PT2E). Its output is compared with
  eager and the difference is reported; accuracy is what matters for it and is checked on real data
  (``benchmarks/peers``), not by a tolerance here.
* ``"eager"``: the model as it is.

``route="auto"`` compiles, verifies, times the eager model and the compiled one on ``example`` and keeps the
faster (a compiled model that fails verification is never returned; the reason is in the report).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from vitkit.export import OnnxRunner, export_onnx, quantize_onnx_int8_best, rel_err
from vitkit.runtime import autocast

ROUTES = ("auto", "eager", "compile", "int8")
DTYPES = ("fp32", "bf16")
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


@dataclasses.dataclass
class OptimizeReport:
    """What :func:`optimize` chose and why: the route, the compile time, the verified error and the timings."""

    route: str
    dtype: str
    compile_s: float | None = None
    max_rel_err: float | None = None  # of the returned route against eager fp32 on ``example``
    eager_ms: float | None = None
    optimized_ms: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Optimized(nn.Module):
    """An inference-only wrapper: ``forward`` runs the chosen form under ``no_grad`` (and bf16 autocast)."""

    def __init__(self, model: nn.Module, fn, report: OptimizeReport):
        super().__init__()
        self.model = model  # the eager model (its attributes: data config, classes, ...)
        self.fn = fn
        self.report = report

    def forward(self, x: torch.Tensor):
        with torch.no_grad(), autocast(x.device, "bf16" if self.report.dtype == "bf16" else "none"):
            return self.fn(x)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


def compile_cache_dir() -> Path:
    """Where Inductor keeps its caches for vitkit (set in the environment before the first compile)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "vitkit" / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_frozen(model: nn.Module, dynamic: bool | None = None) -> nn.Module:
    """``torch.compile`` for inference: Inductor with freezing; ``dynamic`` as torch.compile takes it (None: a
    dynamic batch after the first new shape; False: one specialised program per shape, for benchmarks)."""
    compile_cache_dir()
    return torch.compile(model, dynamic=dynamic, options={"freezing": True})


def _int8_runner(model: nn.Module, calibration) -> tuple[OnnxRunner, dict]:
    """The model exported to ONNX, quantized to int8 and loaded in ONNX Runtime. With two or more calibration
    batches the last is held out to choose the quantized op set (:func:`vitkit.export.quantize_onnx_int8_best`)."""
    calibration = list(calibration)
    calib, check = (calibration[:-1], calibration[-1:]) if len(calibration) > 1 else (calibration, calibration)
    folder = Path(tempfile.mkdtemp(prefix="vitkit-int8-"))
    try:
        export_onnx(model, folder / "fp32.onnx", tuple(model.pretrained_cfg["input_size"]))
        kept = quantize_onnx_int8_best(model, folder / "fp32.onnx", folder / "int8.onnx", calib, check)
        return OnnxRunner(folder / "int8.onnx"), kept
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the session holds the model in memory


def _time_ms(fn, x: torch.Tensor, repeats: int) -> float:
    from vitkit.bench.speed import timeit  # bench imports models; kept out of this module's import time

    with torch.no_grad():
        return timeit(lambda: fn(x), warmup=1, repeats=repeats) * 1e3


def optimize(
    model: nn.Module,
    example: torch.Tensor | None = None,
    dtype: str = "fp32",
    route: str = "auto",
    calibration: Iterable[torch.Tensor] | None = None,
    rtol: float | None = None,
    repeats: int = 5,
) -> Optimized:
    """The fastest verified inference form of ``model`` for this machine (see the module docstring).

    Args:
        model: any vitkit model (it is put in eval mode; for ``int8`` its ONNX export is quantized).
        example: an input batch at the shape it will serve (default: 2 images at the model's data config).
        dtype: 'fp32' or 'bf16' (bf16 autocast; on a CPU without native bf16 it is much slower, see
            :func:`vitkit.machine.native_bf16`).
        route: 'auto' (the faster of eager and compiled), 'compile', 'eager' or 'int8'.
        calibration: batches for int8 calibration (default: ``example`` alone, which is too little for accuracy).
        rtol: the verification tolerance (default 1e-4 fp32, 5e-2 bf16).
        repeats: timed repeats per route for 'auto' (and for the report).

    Raises:
        ValueError: an unknown route or dtype, or a compiled/quantized form that differs from eager beyond ``rtol``
            when that route was asked for explicitly.
    """
    if route not in ROUTES:
        raise ValueError(f"optimize: route must be one of {ROUTES}, got {route!r}")
    if dtype not in DTYPES:
        raise ValueError(f"optimize: dtype must be one of {DTYPES}, got {dtype!r}")
    if route == "int8" and dtype != "fp32":
        raise ValueError("optimize: route='int8' takes fp32 inputs (dtype='fp32'); the int8 kernels are its own")
    model = model.eval()
    if example is None:
        c, h, w = model.pretrained_cfg["input_size"]
        example = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    tol = TOLERANCE[dtype] if rtol is None else rtol
    ctx = autocast(example.device, "bf16") if dtype == "bf16" else contextlib.nullcontext()
    with torch.no_grad():
        ref = model(example).float()
    report = OptimizeReport(route="eager", dtype=dtype)
    if route == "eager":
        return Optimized(model, model, report)

    t0 = time.perf_counter()
    if route == "int8":
        fn, kept = _int8_runner(model, calibration or [example])
        report.note = f"int8 ops: {kept['label']} (the most accurate)"
    else:
        fn = compile_frozen(model)
    with torch.no_grad(), ctx:
        out = fn(example)
    report.compile_s = round(time.perf_counter() - t0, 2)
    err = rel_err(out, ref)
    if route == "int8":  # accuracy is checked on data; the error is reported
        report.route, report.max_rel_err = "int8", err
        return Optimized(model, fn, report)
    if err > tol:
        if route == "compile":
            raise ValueError(f"optimize: the compiled model differs from eager by {err:.3g} (relative) > {tol:g}")
        report.note = f"compiled output differs from eager by {err:.3g} > {tol:g}: eager kept"
        return Optimized(model, model, report)

    def eager(x):
        with ctx:
            return model(x)

    def compiled(x):
        with ctx:
            return fn(x)

    report.eager_ms = round(_time_ms(eager, example, repeats), 3)
    report.optimized_ms = round(_time_ms(compiled, example, repeats), 3)
    if route == "auto" and report.optimized_ms >= report.eager_ms:
        report.note = f"compiled {report.optimized_ms} ms >= eager {report.eager_ms} ms at this shape: eager kept"
        report.max_rel_err = 0.0
        return Optimized(model, model, report)
    report.route, report.max_rel_err = "compile", err
    return Optimized(model, fn, report)
