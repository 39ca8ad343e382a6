"""Speed, memory and model FLOP utilisation (MFU) against the machine's own measured matmul peak.

* ``matmul_peak(dtype)``: dense square matmul throughput (FLOP/s) on this machine and thread count, the
  median of timed repeats; the yardstick that makes results comparable across machines.
* ``bench_model(...)``: inference throughput at a batch size and latency at batch 1 (warm-up, then the
  median of repeats), optional training-step throughput, peak memory of one forward pass, GMACs and MFU
  = ``2 * MACs * images/s / peak FLOP/s``. ``dtype='bf16'`` tries autocast and bf16 weights and keeps the
  faster (reported in ``bf16_mode``). ``runtime='torchscript'`` measures the same model traced and frozen, with
  TorchScript's oneDNN Graph fuser (:func:`vitkit.export.onednn_graph_fusion`), after checking its output.
* Peak memory: on CUDA ``max_memory_allocated``; on Linux CPUs the growth of the process's resident-set
  high-water mark over the call (``/proc/self/clear_refs`` resets it), measured under
  :func:`vitkit.bench.allocator.exact_accounting` so that freed tensors leave the resident set; the allocator's
  previous policy is restored afterwards, so memory measurement never slows later timings. Elsewhere None.
  ``tensor_peak_mb`` counts the bytes of live tensors instead: deterministic, blind to the allocator.
* ``bench_model`` switches the process to :func:`vitkit.bench.allocator.tune_allocator`'s policy first
  (``tune_malloc=False`` keeps glibc's defaults) and records the policy in the row's ``allocator``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import vitkit
from vitkit.bench import allocator
from vitkit.bench.flops import count_macs, count_params
from vitkit.config import TrainConfig
from vitkit.layers import fuse_conv_bn
from vitkit.machine import cpu_info, cpu_kind, cpu_line
from vitkit.routes import TOLERANCE, compile_frozen, rel_err
from vitkit.runtime import autocast
from vitkit.tasks import build_task, model_task, task_class
from vitkit.train.optim import build_optimizer
from vitkit.train.step import TrainStep

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timeit(fn: Callable[[], object], warmup: int = 2, repeats: int = 5, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn`` in seconds, after ``warmup`` untimed calls (CUDA is synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@cache
def matmul_peak(dtype: str = "fp32", n: int | None = None, device: str = "cpu", threads: int | None = None) -> float:
    """Measured dense matmul throughput in FLOP/s (``2 n^3`` per ``n x n`` product), median of repeats.

    ``n=None`` picks the size: it doubles from 256 up to 2048 while one product takes under 50 ms, so fp32 (and
    native bf16) is measured at 2048 while a dtype the CPU emulates (bf16 on AVX2, ~1 GFLOP/s) stops at 512
    and takes a second, not minutes.
    """
    if n is None:
        n = 256
        while n < 2048:
            a = torch.randn(n, n, device=device).to(DTYPES[dtype])
            if timeit(lambda a=a: torch.mm(a, a), warmup=1, repeats=1) > 0.05:
                break
            n *= 2
    a = torch.randn(n, n, device=device).to(DTYPES[dtype])
    b = torch.randn(n, n, device=device).to(DTYPES[dtype])
    t = timeit(lambda: torch.mm(a, b), warmup=3, repeats=10, min_seconds=1.0)
    return 2 * n**3 / t


def interleaved_times(fns: dict[str, Callable], x: torch.Tensor, rounds: int, warmup: int = 2) -> dict[str, list]:
    """Wall times in ms of each of ``fns`` on ``x``, timed *interleaved*: one call of each per round, so load
    from other processes, heap state and clock changes fall on every route alike (what the peer, edge and int8
    benchmarks compare). ``warmup`` untimed calls of each first; gradients off."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        for _ in range(rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved(fns: dict[str, Callable], x: torch.Tensor, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per call of each of ``fns`` on ``x``, timed interleaved (:func:`interleaved_times`)."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, x, rounds, warmup).items()}


def interleaved_quartiles(fns: dict[str, Callable], x: torch.Tensor, rounds: int) -> dict[str, dict[str, float]]:
    """Median and 25th percentile ms of each of ``fns`` on ``x``, timed interleaved (:func:`interleaved_times`)."""
    return {k: {"median": round(statistics.median(v), 2), "p25": round(statistics.quantiles(v, n=4)[0], 2)}
            for k, v in interleaved_times(fns, x, rounds).items()}  # fmt: skip


def random_case(name: str, batch: int, calibration_batches: int = 3) -> tuple[nn.Module, torch.Tensor, list]:
    """What the compiled-route benchmarks measure a model on: ``name`` with random weights (seed 0) in eval mode,
    a random batch of ``batch`` at its input size and ``calibration_batches`` random batches of 4 (seed 1)."""
    torch.manual_seed(0)
    model = vitkit.create_model(name).eval()
    g = torch.Generator().manual_seed(1)
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(batch, *size, generator=g)
    return model, x, [torch.randn(4, *size, generator=g) for _ in range(calibration_batches)]


def build_timed(builds: dict[str, Callable[[], Callable]], x: torch.Tensor) -> tuple[dict, dict, dict]:
    """Build each form of ``builds`` (label -> a function returning it) and run it once on ``x`` under ``no_grad``:
    ``(forms, outputs, seconds)``, the seconds covering the build and the first call (where a compiled form
    compiles)."""
    forms, outs, seconds = {}, {}, {}
    with torch.no_grad():
        for label, build in builds.items():
            t0 = time.perf_counter()
            forms[label] = build()
            outs[label] = forms[label](x)
            seconds[label] = round(time.perf_counter() - t0, 1)
    return forms, outs, seconds


def _proc_kb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str = "cpu") -> float | None:
    """Peak extra memory (MiB) while ``fn`` runs: CUDA allocator peak, or resident-set growth on Linux."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with allocator.exact_accounting():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            return None
        base = _proc_kb("VmRSS:")
        fn()
        peak = _proc_kb("VmHWM:")
    return None if base is None or peak is None else max(0.0, (peak - base) / 1024)


class _LiveTensors(TorchDispatchMode):
    """Counts the bytes of every tensor storage created by an operator while active, until it is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def live_bytes(self) -> int:
        """Bytes of the counted tensors alive now (those freed since the last operator dropped)."""
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        return self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.live_bytes()  # drop what was freed since the last operator
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                # views and in-place results share an input's storage; tensors from before the call are not ours
                if nbytes and key not in self.live and key not in inputs:
                    self.live[key] = (StorageWeakRef(storage), nbytes)
                    self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def tensor_peak_mb(fn: Callable[[], object]) -> float:
    """Peak MiB of tensors created by operators during ``fn`` and alive at the same time (autograd included).

    Deterministic, any device: it counts what the operators allocate, not what the allocator or the OS hold
    (:func:`peak_memory_mb`), so it does not see allocator caching, fragmentation or memory outside operators
    (e.g. oneDNN scratch buffers). Tensors that existed before the call are not counted.
    """
    with _LiveTensors() as mode:
        fn()
    return mode.peak / 2**20


@dataclass
class BenchRow:
    model: str
    img_size: int
    batch: int
    dtype: str
    params: int
    gmacs: float
    img_per_s: float
    latency_ms: float
    peak_mem_mb: float | None
    mfu: float
    peak_gflops: float
    bf16_mode: str | None = None
    train_img_per_s: float | None = None
    channels_last: bool = False
    compiled: bool = False
    runtime: str = "torch"
    threads: int = 1
    device: str = "cpu"
    allocator: str = "default"
    fused_bn: int = 0
    compile_s: float | None = None  # --compile: the first call's time (compilation included)
    eager_img_per_s: float | None = None  # --compile: the same setting without the compiler, side by side

    def as_dict(self) -> dict:
        return asdict(self)


def _runner(model: nn.Module, mode: str, device: torch.device):
    """``(model, context factory, input dtype)`` for one precision mode: fp32, bf16 autocast or bf16 weights.

    bf16 weights go on a copy, so the caller's fp32 model serves the other modes unchanged.
    """
    if mode == "weights":
        return copy.deepcopy(model).to(torch.bfloat16), contextlib.nullcontext, torch.bfloat16
    if mode == "autocast":
        return model, lambda: autocast(device, "bf16"), torch.float32
    return model, contextlib.nullcontext, torch.float32


LAYOUTS = ("auto", "nchw", "channels_last")
RUNTIMES = ("torch", "torchscript", "onnxruntime", "openvino", "executorch")
EXPORTED = {
    "onnxruntime": ("onnx", "ONNX Runtime"),
    "openvino": ("openvino", "OpenVINO"),
    "executorch": ("executorch", "ExecuTorch"),
}


def _in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def bench_model(
    name: str,
    img_size: int | None = None,
    batch: int = 16,
    dtype: str = "fp32",
    layout: str = "auto",
    compile: bool = False,
    train: bool = False,
    runtime: str = "torch",
    repeats: int = 5,
    device: str = "cpu",
    memory: bool = True,
    tune_malloc: bool = True,
    fuse_bn: bool = False,
    **model_kwargs,
) -> BenchRow:
    """Measure one model at one setting (random weights; speed does not depend on them).

    ``layout``: 'nchw', 'channels_last', or 'auto' (time both, keep the faster; like bf16's two modes, the
    choice is reported, here in ``channels_last``). ``tune_malloc``: switch the process to
    :func:`vitkit.bench.allocator.tune_allocator`'s policy first (reported in ``allocator``). ``fuse_bn``: fold
    BatchNorm into the preceding convolutions for inference (:func:`vitkit.layers.fuse_conv_bn`; reported in
    ``fused_bn``, the number of folded pairs). ``runtime``: 'torch' (eager PyTorch), 'torchscript' (the model
    traced and frozen, run with TorchScript's oneDNN Graph fuser; its output is checked against eager first), or
    an exported artefact in its own runtime, fp32, checked against eager first: 'onnxruntime', 'openvino' (CPU
    plugin) or 'executorch' (XNNPACK delegate); see :mod:`vitkit.export`.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if fuse_bn and train:
        raise ValueError("fuse_bn folds BatchNorm for inference; it cannot be combined with train=True")
    if tune_malloc:
        allocator.tune_allocator()
    dev = torch.device(device)
    kwargs = dict(model_kwargs, **({"img_size": img_size} if img_size else {}))
    model = vitkit.create_model(name, **kwargs).eval().to(dev)
    c, h, w = model.pretrained_cfg["input_size"]
    params, macs = count_params(model), count_macs(model, (c, h, w))
    fused_bn = fuse_conv_bn(model) if fuse_bn else 0
    x = torch.randn(batch, c, h, w, device=dev)
    x1 = x[:1].clone()
    peak = matmul_peak(dtype, device=device)
    bf16_mode = compile_s = eager_ips = None
    layouts = ["nchw", "channels_last"] if layout == "auto" else [layout]
    if runtime in EXPORTED:
        if dtype != "fp32" or compile or train:
            raise ValueError(f"--runtime {runtime} measures fp32 inference only")
        layout = "nchw"
        t_batch, t_one, mem = _bench_exported(model, x, x1, repeats, runtime)
    elif runtime == "torch":
        modes = ["autocast", "weights"] if dtype == "bf16" else ["fp32"]
        best = None
        for lay in layouts:
            m_lay = copy.deepcopy(model).to(memory_format=torch.channels_last) if lay == "channels_last" else model
            for mode in modes:
                m, ctx, in_dtype = _runner(m_lay, mode, dev)
                fwd = compile_frozen(m) if compile else m
                xb, xo = _in_layout(x.to(in_dtype), lay), _in_layout(x1.to(in_dtype), lay)

                def run(inp, fwd=fwd, ctx=ctx):
                    with torch.inference_mode(), ctx():
                        return fwd(inp)

                t0 = time.perf_counter()
                run(xb)  # the first call (compiles under --compile)
                first = time.perf_counter() - t0
                t = timeit(lambda run=run, xb=xb: run(xb), repeats=repeats)
                if best is None or t < best[0]:
                    best = (t, mode, lay, run, xb, xo, first, m, ctx)
        t_batch, bf16_mode, layout, run, xb, xo, first, m, ctx = best
        if compile:
            compile_s = round(first, 2)

            def run_eager(inp, m=m, ctx=ctx):
                with torch.inference_mode(), ctx():
                    return m(inp)

            eager_ips = round(batch / timeit(lambda: run_eager(xb), repeats=repeats), 2)
        bf16_mode = bf16_mode if dtype == "bf16" else None
        t_one = timeit(lambda: run(xo), repeats=max(repeats, 5))
        mem = peak_memory_mb(lambda: run(xb), dev) if memory else None
    else:  # "torchscript" (the runtime was validated above)
        if compile or train:
            raise ValueError("--runtime torchscript measures inference only (no --compile or --train)")
        t_batch, bf16_mode, layout, t_one, mem = _bench_torchscript(model, x, x1, dtype, layouts, repeats, memory)
    if layout == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), _in_layout(x, layout)
    train_ips = _bench_train(model, x, dtype, dev, repeats) if train else None
    ips = batch / t_batch
    return BenchRow(
        model=name,
        img_size=h,
        batch=batch,
        dtype=dtype,
        params=params,
        gmacs=round(macs / 1e9, 4),
        img_per_s=round(ips, 2),
        latency_ms=round(t_one * 1e3, 2),
        peak_mem_mb=None if mem is None else round(mem, 1),
        mfu=round(2 * macs * ips / peak, 4),
        peak_gflops=round(peak / 1e9, 1),
        bf16_mode=bf16_mode,
        train_img_per_s=None if train_ips is None else round(train_ips, 2),
        channels_last=layout == "channels_last",
        compiled=compile,
        runtime=runtime,
        threads=torch.get_num_threads(),
        device=str(dev),
        allocator=allocator.policy(),
        fused_bn=fused_bn,
        compile_s=compile_s,
        eager_img_per_s=eager_ips,
    )


def _bench_train(model: nn.Module, x: torch.Tensor, dtype: str, dev: torch.device, repeats: int) -> float:
    """Images/s of the real training step (:class:`vitkit.train.TrainStep`, the one ``vitkit train`` runs): the
    model's task loss on synthetic targets, AdamW with the default optimizer config, bf16 autocast for bf16."""
    cfg = TrainConfig.from_dict({"model": {"name": model.model_name}, "train": {"ema_decay": 0.0}})
    cfg.set("model.num_classes", max(1, model.num_classes))
    cfg.set("train.amp", "bf16" if dtype == "bf16" else "none")
    datasets = task_class(model_task(model.model_name)).datasets
    if datasets:  # a task that reads its own dataset format (detection: coco); nothing is read here
        cfg.set("data.dataset", datasets[0])
    task = build_task(cfg)
    step = TrainStep(model, task, build_optimizer(model, cfg.optim), cfg.train, cfg.optim, dev)
    batch = [(x, task.example_targets(x))]
    model.train()
    t = timeit(lambda: step(batch, cfg.optim.lr), warmup=1, repeats=max(2, repeats // 2))
    model.eval()
    return x.shape[0] / t


def _checked_trace(model: nn.Module, x: torch.Tensor, dtype: str) -> torch.jit.ScriptModule:
    """:func:`vitkit.export.trace_frozen` of ``model`` at ``x``, warmed up (the oneDNN Graph fuser compiles during
    the profiling calls) and compared with eager: a runtime that computes something else is not timed."""
    from vitkit.export import trace_frozen

    traced = trace_frozen(model, x)
    with torch.no_grad():
        for _ in range(2):
            out = traced(x)
        ref = model(x)
    _check_runtime(model, out, ref, dtype, "TorchScript")
    return traced


def _check_runtime(model: nn.Module, out: torch.Tensor, ref: torch.Tensor, dtype: str, runtime: str) -> None:
    """Refuse to time a runtime whose output differs from eager by more than ``vitkit.routes.TOLERANCE``
    (relative, the same check :func:`vitkit.optimize` applies to a compiled model)."""
    err = rel_err(torch.as_tensor(out), ref)
    if not err <= TOLERANCE[dtype]:
        raise RuntimeError(
            f"{getattr(model, 'name', type(model).__name__)}: the {runtime} runtime's output differs from eager by "
            f"{err:.2e} (relative; tolerance {TOLERANCE[dtype]:.0e} in {dtype}); refusing to time it"
        )


def _bench_torchscript(model, x, x1, dtype: str, layouts: list[str], repeats: int, memory: bool):
    """Traced, frozen TorchScript with the oneDNN Graph fuser; bf16 as bf16 weights (a trace under autocast would
    bake its casts in). Times each layout and keeps the faster; batch-1 latency gets its own trace."""
    from vitkit.export import onednn_graph_fusion

    mode = "weights" if dtype == "bf16" else "fp32"
    best = None
    with onednn_graph_fusion(), torch.no_grad():
        for lay in layouts:
            m_lay = copy.deepcopy(model).to(memory_format=torch.channels_last) if lay == "channels_last" else model
            m, _, in_dtype = _runner(m_lay, mode, x.device)
            xb = _in_layout(x.to(in_dtype), lay)
            traced = _checked_trace(m, xb, dtype)
            t = timeit(lambda traced=traced, xb=xb: traced(xb), repeats=repeats)
            if best is None or t < best[0]:
                best = (t, lay, m, traced, xb, _in_layout(x1.to(in_dtype), lay))
        t_batch, layout, m, traced, xb, xo = best
        one = _checked_trace(m, xo, dtype)
        t_one = timeit(lambda: one(xo), repeats=max(repeats, 5))
        mem = peak_memory_mb(lambda: traced(xb), x.device) if memory else None
    return t_batch, (mode if dtype == "bf16" else None), layout, t_one, mem


def _bench_exported(model: nn.Module, x: torch.Tensor, x1: torch.Tensor, repeats: int, runtime: str):
    """The model exported (:mod:`vitkit.export`) and run in ``runtime``, timed after its output matched eager."""
    from vitkit import export

    fmt, label = EXPORTED[runtime]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"model{export.SUFFIX[fmt]}"
        export.get_format(fmt).write(model, path, export.ExportSpec(tuple(x.shape[1:]), max_batch=x.shape[0]))
        runner = export.load(path, fmt)
        xb, xo = x.cpu(), x1.cpu()
        with torch.no_grad():
            _check_runtime(model, runner(xb), model(x).cpu(), "fp32", label)
        t_batch = timeit(lambda: runner(xb), repeats=repeats)
        t_one = timeit(lambda: runner(xo), repeats=max(repeats, 5))
        mem = peak_memory_mb(lambda: runner(xb))
    return t_batch, t_one, mem


def cpu_stamp() -> dict:
    """What a benchmark record says of where it ran: the CPU in words and flags, torch and the thread count."""
    return dict(cpu=cpu_line(), cpu_info=cpu_info(), torch=torch.__version__, threads=torch.get_num_threads())


def file_model_rows(
    out: Path | str,
    models: list[str],
    batches: list[int],
    row: Callable[[str, int], dict],
    note: str = "",
    before: dict[str, Callable[[], object]] | None = None,
) -> dict:
    """A benchmark's per-model record in the JSON file ``out``, filed under this CPU kind
    (:func:`vitkit.machine.cpu_kind`; another kind's entry is kept) and stamped with the CPU, torch and thread
    count: ``before``'s entries first (name -> a function measuring it), then ``row(model, batch)`` for each model
    and batch under ``models``, the file written after each so that a run cut short keeps what it measured.
    Returns the whole record."""
    out = Path(out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    rec = results.setdefault(cpu_kind(), {"models": {}})
    rec.update(cpu_stamp())
    if note:
        rec["note"] = note
    for key, measure in (before or {}).items():
        rec[key] = measure()
        out.write_text(json.dumps(results, indent=1))
    for name in models:
        for batch in batches:
            rec["models"].setdefault(name, {})[str(batch)] = row(name, batch)
            out.write_text(json.dumps(results, indent=1))
    return results


def model_rows_parser(doc: str, models: list[str], rounds: int, out: Path) -> argparse.ArgumentParser:
    """The command line of a :func:`file_model_rows` benchmark: ``--models``, ``--batches`` (1 8), ``--rounds``,
    ``--note`` (kept with this CPU kind's record) and ``--out``, described by ``doc``'s first paragraph."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=models)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--note", default="", help="a note kept with this CPU kind's record (how the run was made)")
    p.add_argument("--out", default=str(out))
    return p
