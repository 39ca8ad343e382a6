"""Inference routes (eager, compiled, ONNX Runtime, int8) and :func:`optimize`, the fastest verified one here.

The layers in :mod:`vitkit.layers` are plain reference code; speed at inference comes from here:

* ``"compile"``: ``torch.compile`` (Inductor) with freezing (weights folded into the graph as constants, which
  lets Inductor pre-pack them and fold BatchNorm) and Inductor's C++ wrapper (:func:`compile_frozen`), its output
  checked against eager before it is returned (``rtol`` relative to the largest eager output: 1e-4 in fp32, 5e-2
  in bf16). Inductor's on-disk caches live in ``$XDG_CACHE_HOME/vitkit/inductor`` (``~/.cache`` by default;
  ``TORCHINDUCTOR_CACHE_DIR`` overrides), so a second process compiling the same model at the same shapes reuses
  the first one's kernels.
* ``"int8"``: post-training static quantization, calibrated on the batches given (all but the last, which is
  held out to compare candidates), by one of the backends (``int8_backend``): ``"onnxruntime"``, the ONNX
  export quantized by ONNX Runtime's quantizer (the op set chosen among ``vitkit.export.INT8_OP_SETS``) and run by
  ONNX Runtime, or ``"pt2e"``, PyTorch's PT2E flow (:func:`quantize_pt2e_int8`: torchao's x86 Inductor quantizer,
  then the frozen compile, whose int8 convolutions and linears run in oneDNN), and for a model with SiLU or GELU
  ``"pt2e+kernels"``, the same with each such activation between quantized ops a table on uint8 codes
  (:mod:`vitkit.kernels.lut`), on CPUs with AVX-512 VNNI or AMX the matrix products autotuned (Inductor's
  C++ GEMM template timed against oneDNN's int8 linear, ``gemm_autotune`` in :func:`compile_frozen`), and on CPUs
  with AVX-512 BF16 the attention, which PT2E leaves in fp32, with bf16 products
  (:mod:`vitkit.kernels.attention`). ``"auto"``
  builds each where it is installed (and applies) and keeps the fastest whose error on the held-out batch is at
  most 1.5 times the smallest. The error is reported; accuracy is what matters for int8 and is checked on real
  data (``benchmarks/peers``), not by a tolerance here.
* ``"onnxruntime"``: the fp32 ONNX export (dynamic batch) run by ONNX Runtime's CPU provider, checked against
  eager like the compiled form. ONNX Runtime fuses convolutions with their activations and picks its own kernels;
  on the peers benchmark it ran MobileViT-XS 1.25-1.4x and HaloNet-26T 1.16-1.26x faster than the compiled
  model, on an AMD EPYC (AVX2) and an Intel Xeon (AMX) alike, ViT-S/B 1.2x at batch 1 on the AMD EPYC but no
  faster, or slower, at batch 8 and on the Xeon: which wins depends on the model, the batch and the CPU, so 'auto'
  measures (``benchmarks/peers``).
* ``"compile"`` at a static batch size and with a symbolic one (``symbolic_batch`` in :func:`compile_frozen`:
  oneDNN linears, convolution weights packed per call), timed against each other like the routes; the report's
  ``symbolic_batch`` says which was kept.
* ``"compile+kernels"`` ('auto' only, fp32, models with a layer that :mod:`vitkit.kernels` has a kernel for): a
  copy of the model with those layers swapped for their kernel versions, then compiled like ``"compile"``. It is
  timed against the plain compiled form like every other candidate, so it is kept only where it is faster here;
  where the kernel cannot be built (no compiler, not x86) the reason is in the report's note.
* ``"eager"``: the model as it is.

``route="auto"`` builds every form it can here (compiled, and with vitkit's kernels where they apply; ONNX Runtime
in fp32 when the ``export`` extra is installed), verifies each against eager, times the verified ones and eager on
``example`` and keeps the fastest (a form that fails verification is never returned; what was refused is in the
report's note, every timing in its ``timings``). With onnxruntime installed, 'auto' therefore also exports the
model to ONNX (seconds to a minute) and holds the eager, compiled and ONNX Runtime forms in memory together while it
times them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from vitkit import kernels
from vitkit.export import OnnxRunner, export_onnx, quantize_onnx_int8_best, rel_err
from vitkit.export.common import require, torch_program
from vitkit.kernels import attention, lut
from vitkit.machine import int8_dot_units, int8_gemm_template
from vitkit.runtime import autocast

ROUTES = ("auto", "eager", "compile", "onnxruntime", "int8")
INT8_BACKENDS = ("auto", "onnxruntime", "pt2e", "pt2e+kernels")
INT8_ERROR_SLACK = 1.5  # 'auto' int8: the fastest form within this factor of the smallest held-out error
DTYPES = ("fp32", "bf16")
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}
SYMBOLIC = ", symbolic batch"  # the name of a compiled form's symbolic-batch twin in a report's timings


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
    timings: dict = dataclasses.field(default_factory=dict)  # ms of every verified form timed, eager included
    symbolic_batch: bool = False  # a compiled route whose batch size is a symbol (:func:`compile_frozen`)

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


class Frozen(nn.Module):
    """A ``torch.compile``d model whose compiles run with Inductor's freezing on (see :func:`compile_frozen`)."""

    def __init__(
        self,
        model: nn.Module,
        dynamic: bool | None,
        symbolic_batch: bool = False,
        cpp_wrapper: bool | None = None,
        module_guards: bool = True,
        gemm_autotune: bool = False,
    ):
        super().__init__()
        self.symbolic_batch, self.cpp_wrapper, self.gemm_autotune = symbolic_batch, cpp_wrapper, gemm_autotune
        self.model = model  # (registered, so the wrapper's parameters and state dict are the model's)
        from vitkit.kernels.linear import OneDnnLinear

        self._packed = [m for m in model.modules() if isinstance(m, OneDnnLinear)]  # (vitkit.kernels.linear)

        def inductor(gm, example_inputs):  # a backend of this wrapper's own: its programs are never shared
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)

        def run(x):
            return model(x)

        # Dynamo files its programs, and counts them against its recompile limit (8), under the code object of the
        # frame it compiles. Every vitkit model's forward is one function (``models._base``), so compiling models
        # directly, the ninth compiled form in a process would run eager, silently; a code object of this wrapper's
        # own gives each form its own count.
        run.__code__ = run.__code__.replace()
        # (without module guards, Dynamo checks only the input and the global state at a call, not every module's
        # attributes and parameters)
        skip = {} if module_guards else {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self.compiled = torch.compile(run, dynamic=dynamic, backend=inductor, options=skip or None)

    def forward(self, x: torch.Tensor):
        import torch._inductor.config as inductor_config

        for layer in self._packed:  # a weight changed since it was packed: pack it before a compile can freeze it
            if layer.stale():
                layer.pack()
        if self.symbolic_batch:  # on an alias, so the caller's tensor carries no mark
            from torch._dynamo.decorators import mark_unbacked

            x = x.view(x.shape)
            mark_unbacked(x, 0)
        # read by Dynamo while it traces (parameters become constants) and by Inductor while it compiles, both of
        # which happen inside a call (the first at each new shape)
        cpp_wrapper = x.device.type == "cpu" if self.cpp_wrapper is None else self.cpp_wrapper
        options = {"freezing": True, "cpp_wrapper": cpp_wrapper}
        if self.gemm_autotune and x.device.type == "cpu":  # (CPU templates; its timing reports silenced)
            options.update(
                max_autotune=True,
                max_autotune_gemm_backends=_GEMM_BACKENDS,
                autotune_num_choices_displayed=0,
                max_autotune_report_choices_stats=False,
            )
        with inductor_config.patch(options):
            return self.compiled(x)


_GEMM_BACKENDS = "CPP,ATEN"  # Inductor's C++ GEMM template, and the library op (oneDNN/MKL) it is timed against


def compile_frozen(
    model: nn.Module,
    dynamic: bool | None = None,
    symbolic_batch: bool = False,
    cpp_wrapper: bool | None = None,
    module_guards: bool = True,
    gemm_autotune: bool = False,
) -> nn.Module:
    """``torch.compile`` for inference: Inductor with freezing; ``dynamic`` as torch.compile takes it (None: a
    dynamic batch after the first new shape; False: one specialised program per shape, for benchmarks).

    Freezing applies to compiles under ``torch.no_grad``: the weights become constants of the program (BatchNorm
    folded into the convolutions, weights pre-packed for oneDNN/MKL), so the compiled form is a snapshot of the
    weights at its first call; after changing them, compile again. Each call of this function gets a backend of its
    own, so a frozen program is never reused by another ``torch.compile`` of the same model, nor another's by it.
    Freezing is switched on in Inductor's config around each call, not passed as ``torch.compile(options=
    {"freezing": True})``, which torch 2.13 and 2.14 accept and ignore (Dynamo reads the setting while it traces;
    the generated code kept every BatchNorm; ``tests/test_optimize.py`` checks the folding). Measured with real
    freezing against that (1 thread, AMD EPYC, ``benchmarks/peers``' models): MobileViT-XS 1.19x (batch 1) / 1.27x
    (batch 8) faster, HaloNet-26T 1.17x / 1.05x, ViT-S 1.05x / 1.02x, NesT-T 0.95x / 0.97x, HaloNet-H1 0.94x (batch
    1). The per-call switch costs about 30 us.

    ``cpp_wrapper``: Inductor's C++ wrapper runs the program (it calls the generated kernels and the library ops
    from C++, where the Python wrapper spends a few microseconds of interpreter time on each of the hundreds of
    calls), which pays most in the int8 programs, whose quantize/dequantize steps and activation tables add calls.
    None (the default): the C++ wrapper for CPU inputs, the Python one on a GPU (where it was not measured, and the
    C++ wrapper's compile is longer). Measured interleaved in one process, two runs (AVX-512 AMD EPYC, Zen 4, 1
    thread, ``benchmarks/speed/cpp_wrapper.py``): the int8 programs of MobileViT-XS and ViT-S 1.00-1.15x faster
    than with the Python wrapper, fp32 compiled models 1.00-1.07x in a quiet run and 0.97-1.02x in a noisy one; the
    compile takes longer (0.6-3.3 s for the fp32 programs, 7-20 s for the int8 ones, the C++ form built after
    the Python one). ``False``: the Python wrapper.

    ``module_guards=False``: at each call Dynamo checks the input and the global state but not the attributes of
    ``model``'s modules (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``): the guards took 0.5-0.7 ms a call
    for MobileViT-XS (its training flags, hooks and parameters) and 0.09 ms without those on modules. A program
    compiled for eval mode then also runs for the model switched to training mode, or with a hook added; so only
    for a module nobody changes after: the int8 program that :func:`quantize_pt2e_int8` converts and compiles,
    which vitkit holds alone.

    ``gemm_autotune=True``: Inductor's ``max_autotune`` with the ``CPP,ATEN`` GEMM backends. For each matrix product
    of the program it times, at compile, a GEMM it generates for this CPU (a C++ micro-kernel: AVX-512 VNNI or AMX
    for int8, AVX-512/AVX2 FMA for fp32) against the library op (oneDNN's int8 linear, whose calls cost 20-25 us
    besides their arithmetic; MKL/oneDNN in fp32) and keeps the faster. Measured interleaved (AVX-512 AMD EPYC, Zen
    4, 1 thread, ``benchmarks/speed/gemm_autotune.py``): the int8 programs of ViT-S 1.13x (batch 1) / 1.03x (batch
    8) and MobileViT-XS 1.01-1.04x (two runs) / 1.02x faster; fp32 programs 0.97-1.01x, so the fp32 routes leave it
    off. It costs compile time at each batch size (+63-97 s for those int8 programs). For int8 the template has
    vector kernels for AVX-512 VNNI and AMX only (elsewhere a scalar reference GEMM, which loses), so
    :func:`optimize`'s ``"pt2e+kernels"`` int8 form uses it where :func:`vitkit.machine.int8_gemm_template` is
    true. CPU inputs only (on a GPU: off).

    ``symbolic_batch=True`` marks the batch dimension of each input unbacked (``mark_unbacked``: a symbol even at
    size 1, which Dynamo otherwise specialises), so one program serves every batch size (in the families whose
    forward captures it in one graph: ViT, hybrid ViT, NesT, LaViT, PVT; the others break the graph at a guard on
    it, ``tests/test_optimize.py``, and run in compiled pieces), and Inductor then runs
    the linears through oneDNN (``mkldnn._linear_pointwise``) instead of the MKL packed GEMM it uses for fp32 at
    static shapes, but packs the convolution weights on every call (it packs them once only at a static input
    size). Which is faster depends on the CPU and the model: on the AVX-512 AMD EPYC (Zen 4), 1 thread, oneDNN's
    GEMM ran ViT's shapes at 85-103 GFLOP/s against MKL's 64-77, and the symbolic batch made ViT-S/B and NesT-T
    1.12-1.37x faster, MobileViT-XS 0.95-0.97x and the HaloNets 0.87-0.96x (``benchmarks/speed/symbolic_batch.py``),
    so :func:`optimize` measures both.
    """
    compile_cache_dir()
    return Frozen(model, dynamic, symbolic_batch, cpp_wrapper, module_guards, gemm_autotune)


def compile_with_kernels(model: nn.Module, dynamic: bool | None = None, symbolic_batch: bool = False) -> nn.Module:
    """:func:`compile_frozen` of a copy of ``model`` with :func:`vitkit.kernels.apply` (``model`` keeps its plain
    layers); ``RuntimeError`` with the reason where the kernels cannot be built here."""
    with_kernels = copy.deepcopy(model)
    kernels.apply(with_kernels)
    return compile_frozen(with_kernels, dynamic=dynamic, symbolic_batch=symbolic_batch)


def _onnx_runner(model: nn.Module, example: torch.Tensor, calib=None, check=None) -> tuple[OnnxRunner, dict | None]:
    """The model exported to ONNX (dynamic batch, ``example``'s image size) and loaded in ONNX Runtime; with
    ``calib`` batches, quantized to int8 first, the op set chosen on the ``check`` batches
    (:func:`vitkit.export.quantize_onnx_int8_best`), whose choice is returned."""
    folder = Path(tempfile.mkdtemp(prefix="vitkit-onnx-"))
    try:
        path = export_onnx(model, folder / "fp32.onnx", tuple(example.shape[1:]))
        if calib is None:
            return OnnxRunner(path), None
        kept = quantize_onnx_int8_best(model, path, folder / "int8.onnx", calib, check)
        return OnnxRunner(folder / "int8.onnx"), kept
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the session holds the model in memory


def quantize_pt2e_int8(
    model: nn.Module,
    example: torch.Tensor,
    calibration: Iterable[torch.Tensor],
    tables: bool = False,
    cpp_wrapper: bool | None = None,
    module_guards: bool = False,
    gemm_autotune: bool = False,
    bf16_attention: bool = False,
):
    """Static int8 through PyTorch's PT2E flow, compiled: the model's ``torch.export`` program (dynamic batch),
    annotated by torchao's ``X86InductorQuantizer`` (its default: int8 weights per output channel, uint8 activations
    per tensor, on convolutions, linears and the ops around them; 7-bit activations where
    :func:`vitkit.machine.int8_dot_units` is false), observed on ``calibration``, converted to
    quantize/dequantize pairs and compiled with freezing (:func:`compile_frozen`), which folds the int8 weights and
    lowers each pattern to oneDNN's int8 convolution or linear (VNNI/AMX where the CPU has them). Uses torchao (the
    ``int8`` extra), the maintained home of PT2E since ``torch.ao.quantization`` was deprecated. Returns a callable
    that compiles at the first call of each batch size. (An earlier attempt failed on ``onednn.qconv_prepack``
    with torch 2.13 and torchao 0.18; the prepack op is folded away only under freezing, which ``compile_frozen``
    did not then switch on. With real freezing, MobileViT-XXS and ViT quantize and compile here.)

    ``tables=True`` (:mod:`vitkit.kernels.lut`): each SiLU or GELU that the quantizer would fuse into the
    convolution or linear before it (oneDNN's ``swish``/``gelu_erf`` post-ops: a transcendental per value, as dear
    as in fp32) or leave to Inductor in fp32 is quantized apart instead, the producer writing uint8 codes, and the
    activation between codes becomes a 256-byte table looked up by ``vitkit::lut_u8``: one more rounding (the
    pre-activation to 8 bits) for a pass over bytes. ``RuntimeError`` where the model has no such activation or
    the kernel cannot be built. Measured on the AVX-512 AMD EPYC (Zen 4), 1 thread: MobileViT-XS (SiLU) 1.21x
    (batch 1) and 1.28x (batch 8) faster than the plain PT2E form, 1.36x / 2.02x vitkit's fastest fp32 route (ONNX
    Runtime; 1.54-1.57x / 1.91-1.96x with the C++ wrapper, in noisier runs; 1.69x / 1.97x with the GEMM autotune
    too, in one run; 2.06-2.15x / 2.58x with the bf16 attention too); ViT-S (GELU) 1.04x faster, 2.56x /
    2.54x its fastest fp32 route (3.16x / 3.12x with the bf16 attention); the MNIST recipes' MobileViT-XXS and ViT
    as accurate as with the plain form
    (``benchmarks/peers/README.md``).

    ``cpp_wrapper``, ``module_guards`` and ``gemm_autotune`` as in :func:`compile_frozen` (the converted program is
    this function's alone, so by default Dynamo does not re-check its modules at each call; ``gemm_autotune=True``
    lets Inductor's generated int8 GEMM replace oneDNN's linear where it times faster).

    ``bf16_attention=True`` (:mod:`vitkit.kernels.attention`): each plain attention (SDPA without a mask), which
    the quantizer leaves in fp32 between the dequantized Q, K, V and the quantized output projection, runs with its
    two products in bf16 (AVX-512 BF16; ``RuntimeError`` on a CPU without it). Attention with a mask (relative
    positions, HaloNet's halos) stays as it is."""
    require("torchao", "int8 through PT2E (torchao)", "int8")
    if tables and (reason := lut.unavailable_reason()):
        raise RuntimeError(f"int8 activation tables: vitkit.kernels.lut {reason}")
    if bf16_attention and (reason := attention.unavailable_reason()):
        raise RuntimeError(f"int8 with bf16 attention: vitkit.kernels.attention {reason}")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    # 7-bit activations on x86 CPUs without VNNI/AMX (torchao's advice): oneDNN's u8 x s8 kernels there sum pairs of
    # products in saturating 16-bit lanes (vpmaddubsw), as ONNX Runtime's do (see vitkit.export.quantize_onnx_int8)
    config = xiq.get_default_x86_inductor_quantization_config(reduce_range=not int8_dot_units())
    quantizer = (_apart_quantizer() if tables else xiq.X86InductorQuantizer)().set_global(config)
    exported = torch_program(model, tuple(example.shape[1:])).module()
    if tables:
        lut.drop_inference_dropouts(exported)
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    converted = convert_pt2e(prepared)
    if tables and not lut.tabulate_activations(converted):
        name = type(model).__name__
        raise RuntimeError(f"int8 activation tables: {name} has no SiLU or GELU after a convolution or linear to table")
    if bf16_attention:
        attention.replace_sdpa(converted)
    quantized = sum(str(n.target).startswith("quantized_decomposed.quantize") for n in converted.graph.nodes)
    if not quantized:  # seen with torchao 0.17 and torch 2.11: the quantizer matched nothing and the "int8" was fp32
        import torchao

        raise RuntimeError(
            f"int8 through PT2E: the quantizer annotated none of {type(model).__name__}'s ops (torchao "
            f"{torchao.__version__}, torch {torch.__version__}), so the result would be the fp32 model; use "
            "int8_backend='onnxruntime' or a torchao release made for this torch"
        )
    # one program per batch size: with a dynamic batch, torch 2.13's Inductor recompiled the int8 ViT into code that
    # failed its own stride assertion at the second batch size. A callable, not a module: an exported program
    # refuses train()/eval(), which a wrapping module passes down
    compiled = compile_frozen(
        converted, dynamic=False, cpp_wrapper=cpp_wrapper, module_guards=module_guards, gemm_autotune=gemm_autotune
    )
    return compiled.forward


def pt2e_kernel_options() -> dict:
    """The keyword arguments of :func:`quantize_pt2e_int8` for ``optimize``'s ``"pt2e+kernels"`` int8 form here:
    activation tables, the GEMM autotune where Inductor's int8 template has vector kernels
    (:func:`vitkit.machine.int8_gemm_template`) and the bf16 attention where its kernel runs
    (:func:`vitkit.kernels.attention.usable`). Benchmarks that time this form build it from here too."""
    return {"tables": True, "gemm_autotune": int8_gemm_template(), "bf16_attention": attention.usable()}


def _apart_quantizer():
    """torchao's ``X86InductorQuantizer`` with :func:`vitkit.kernels.lut.annotate_activations_apart` after its own
    annotation (a class made at first use: torchao is an optional dependency)."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    class ActivationsApart(xiq.X86InductorQuantizer):
        def annotate(self, gm):
            gm = super().annotate(gm)
            lut.annotate_activations_apart(gm)
            return gm

    return ActivationsApart


def _int8(model: nn.Module, example: torch.Tensor, calibration, backend: str, repeats: int, report):
    """The int8 form(s) of ``backend`` ('auto': both where installed), each checked on the held-out batch (the last
    calibration batch; with a single batch, that batch itself); returns the chosen callable with ``report`` filled
    in."""
    calibration = list(calibration)
    calib, check = (calibration[:-1], calibration[-1:]) if len(calibration) > 1 else (calibration, calibration)
    wanted = (
        [backend]
        if backend != "auto"
        else [b for b, m in (("onnxruntime", "onnxruntime"), ("pt2e", "torchao")) if _installed(m)]
    )
    if backend == "auto" and "pt2e" in wanted and lut.tables_apply(model):
        wanted.append("pt2e+kernels")
    if not wanted:
        raise ValueError("optimize: route='int8' needs onnxruntime (the export extra) or torchao (the int8 extra)")
    with torch.no_grad():
        refs = [model(x).float() for x in check]
    forms, notes = {}, []  # backend -> (fn, build seconds, held-out error)
    for name in wanted:
        t0 = time.perf_counter()
        try:
            if name == "onnxruntime":
                fn, kept = _onnx_runner(model, example, calib, check)
                notes.append(f"onnxruntime int8 ops: {kept['label']} (the most accurate)")
            elif name == "pt2e":
                fn = quantize_pt2e_int8(model, example, calib)
            else:
                fn = quantize_pt2e_int8(model, example, calib, **pt2e_kernel_options())
            with torch.no_grad():
                fn(example)  # (PT2E compiles here)
                err = max(rel_err(fn(x), ref) for x, ref in zip(check, refs))
            if not math.isfinite(err):
                raise ValueError(f"the {name} int8 form's output on the held-out batch is not finite")
        except Exception as e:  # noqa: BLE001 - 'auto' goes on with the other backend
            if backend != "auto":
                raise
            notes.append(f"{name} not built ({type(e).__name__}: {str(e)[:200]})")
            continue
        forms[name] = (fn, round(time.perf_counter() - t0, 2), err)
        notes.append(f"{name} held-out error {err:.3g}")
    if not forms:
        raise RuntimeError("optimize: no int8 form could be built here: " + "; ".join(notes))
    ms = {name: round(_time_ms(fn, example, repeats), 3) for name, (fn, _, _) in forms.items()}
    smallest = min(err for _, _, err in forms.values())
    eligible = [name for name, (_, _, err) in forms.items() if err <= INT8_ERROR_SLACK * smallest]
    best = min(eligible, key=ms.get)
    fn, report.compile_s, _ = forms[best]
    report.eager_ms = round(_time_ms(model, example, repeats), 3)
    report.route, report.optimized_ms, report.timings = "int8", ms[best], {**ms, "eager": report.eager_ms}
    report.note = "; ".join(notes + [f"{name} {t} ms" for name, t in ms.items()] + [f"int8 backend: {best}"])
    return fn


def _time_ms(fn, x: torch.Tensor, repeats: int, ctx=contextlib.nullcontext) -> float:
    """Median milliseconds of ``fn(x)`` under ``no_grad`` and ``ctx()`` (bf16 autocast for a bf16 route)."""
    from vitkit.bench.speed import timeit  # bench imports models; kept out of this module's import time

    def call():
        with ctx():
            return fn(x)

    with torch.no_grad():
        return timeit(call, warmup=1, repeats=repeats) * 1e3


def optimize(
    model: nn.Module,
    example: torch.Tensor | None = None,
    dtype: str = "fp32",
    route: str = "auto",
    calibration: Iterable[torch.Tensor] | None = None,
    rtol: float | None = None,
    repeats: int = 5,
    int8_backend: str = "auto",
    symbolic_batch: bool | None = None,
) -> Optimized:
    """The fastest verified inference form of ``model`` for this machine (see the module docstring).

    Args:
        model: any vitkit model (it is put in eval mode; for ``int8`` its ONNX export is quantized).
        example: an input batch at the shape it will serve (default: 2 images at the model's data config).
        dtype: 'fp32' or 'bf16' (bf16 autocast; on a CPU without native bf16 it is much slower, see
            :func:`vitkit.machine.native_bf16`); 'int8' is the same as ``route="int8"``.
        route: 'auto' (the fastest verified of eager, compiled and, in fp32 with the export extra, ONNX Runtime),
            'compile', 'onnxruntime', 'eager' or 'int8'.
        calibration: batches for int8 calibration (default: ``example`` alone, which is too little for accuracy).
        int8_backend: for 'int8': 'onnxruntime', 'pt2e', 'pt2e+kernels' (PT2E with activation tables and, with
            AVX-512 VNNI or AMX, autotuned GEMMs, :func:`quantize_pt2e_int8`) or 'auto' (each where installed
            and, for the tables, where the model has SiLU or GELU; see the module docstring).
        rtol: the verification tolerance (default 1e-4 fp32, 5e-2 bf16).
        repeats: timed repeats per route for 'auto' (and for the report).
        symbolic_batch: compile with the batch size as a symbol (see :func:`compile_frozen`) or not; None: 'auto'
            and 'compile' build the plain compiled form both ways and keep the faster ('auto' builds the kernel
            form static). The report says which was kept (``symbolic_batch``).

    Raises:
        ValueError: an unknown route or dtype, or a compiled or ONNX Runtime form that differs from eager beyond
            ``rtol`` when that route was asked for explicitly.
    """
    if route not in ROUTES:
        raise ValueError(f"optimize: route must be one of {ROUTES}, got {route!r}")
    if dtype == "int8":  # the spelling: int8 is a route of its own, with fp32 inputs
        if route not in ("auto", "int8"):
            raise ValueError(f"optimize: dtype='int8' is route='int8'; it cannot be combined with route={route!r}")
        dtype, route = "fp32", "int8"
    if dtype not in DTYPES:
        raise ValueError(f"optimize: dtype must be one of {DTYPES + ('int8',)}, got {dtype!r}")
    if int8_backend not in INT8_BACKENDS:
        raise ValueError(f"optimize: int8_backend must be one of {INT8_BACKENDS}, got {int8_backend!r}")
    if route in ("int8", "onnxruntime") and dtype != "fp32":
        raise ValueError(f"optimize: route={route!r} takes fp32 inputs (dtype='fp32'); it runs its own kernels")
    model = model.eval()
    if example is None:
        c, h, w = model.pretrained_cfg["input_size"]
        example = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    tol = TOLERANCE[dtype] if rtol is None else rtol
    amp = (lambda: autocast(example.device, "bf16")) if dtype == "bf16" else contextlib.nullcontext
    with torch.no_grad():
        ref = model(example).float()
    report = OptimizeReport(route="eager", dtype=dtype)
    if route == "eager":
        return Optimized(model, model, report)
    if route == "int8":  # accuracy is checked on data; the error is reported
        fn = _int8(model, example, calibration or [example], int8_backend, repeats, report)
        with torch.no_grad():
            report.max_rel_err = rel_err(fn(example), ref)
        return Optimized(model, fn, report)

    def build(name: str):
        base, symbolic = name.removesuffix(SYMBOLIC), name.endswith(SYMBOLIC)
        if base == "compile":
            return compile_frozen(model, symbolic_batch=symbolic)
        if base == "compile+kernels":
            return compile_with_kernels(model, symbolic_batch=symbolic)
        return _onnx_runner(model, example)[0]

    if symbolic_batch not in (None, False, True):
        raise ValueError(f"optimize: symbolic_batch must be None, False or True, got {symbolic_batch!r}")
    modes = {None: ("", SYMBOLIC), False: ("",), True: (SYMBOLIC,)}[symbolic_batch]
    wanted = [route + mode for mode in modes] if route == "compile" else [route]
    if route == "auto":
        wanted = ["compile" + mode for mode in modes]
        if dtype == "fp32" and example.device.type == "cpu" and kernels.applicable(model):
            # static unless asked: its linears are oneDNN's already, and a symbolic batch packs convolutions per call
            wanted.append("compile+kernels" + (SYMBOLIC if symbolic_batch else ""))
        wanted += ["onnxruntime"] if _onnx_route_possible(dtype) else []
    forms, notes = {}, []  # route -> (fn, build seconds, relative error)
    for name in wanted:
        # 'auto' goes on without a form that fails here, as does 'compile' without a symbolic form not asked for
        optional = route == "auto" or (name.endswith(SYMBOLIC) and symbolic_batch is None)
        t0 = time.perf_counter()
        try:
            fn = build(name)
            with torch.no_grad(), amp():
                out = fn(example)
        except Exception as e:  # noqa: BLE001 - an optional form that cannot be built here is noted
            if not optional:
                raise
            notes.append(f"{name} not built ({type(e).__name__}: {str(e)[:200]})")
            continue
        err = rel_err(out, ref)
        if err > tol:
            if not optional:
                raise ValueError(f"optimize: the {name} form differs from eager by {err:.3g} (relative) > {tol:g}")
            notes.append(f"{name} output differs from eager by {err:.3g} > {tol:g}: refused")
            continue
        forms[name] = (fn, round(time.perf_counter() - t0, 2), err)

    report.eager_ms = round(_time_ms(model, example, repeats, amp), 3)
    ms = {name: round(_time_ms(fn, example, repeats, amp), 3) for name, (fn, _, _) in forms.items()}
    report.timings = {**ms, "eager": report.eager_ms}
    notes += [f"{name} {t} ms" for name, t in ms.items()] + [f"eager {report.eager_ms} ms"]
    best = min(ms, key=ms.get) if ms else None
    if route == "auto" and (best is None or ms[best] >= report.eager_ms):
        report.note = "; ".join(notes) + ": eager kept"
        report.max_rel_err = 0.0
        return Optimized(model, model, report)
    fn, report.compile_s, report.max_rel_err = forms[best]
    report.route, report.optimized_ms, report.note = best.removesuffix(SYMBOLIC), ms[best], "; ".join(notes)
    report.symbolic_batch = best.endswith(SYMBOLIC)
    return Optimized(model, fn, report)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _onnx_route_possible(dtype: str) -> bool:
    """ONNX Runtime is a candidate for 'auto' in fp32 where it is installed (it runs the fp32 export)."""
    return dtype == "fp32" and _installed("onnxruntime")
