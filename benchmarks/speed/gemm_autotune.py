"""Inductor's C++ GEMM template, autotuned against the library op, in vitkit's compiled routes
(``compile_frozen(gemm_autotune=True)``, ``quantize_pt2e_int8(gemm_autotune=True)``).

    OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/speed/gemm_autotune.py
    ... gemm_autotune.py --models mobilevit_xs --batches 1 8 --rounds 41 [--no-fp32]

-> ``gemm_autotune.json``, one entry per CPU kind (never overwritten by another kind's).

With ``max_autotune`` and the ``CPP,ATEN`` GEMM backends, Inductor times, for each matrix product of the program at
its shape, a GEMM it generates (a C++ micro-kernel for the CPU's vector units: AVX-512 VNNI or AMX for int8,
AVX-512/AVX2 FMA for fp32) against the library op it would otherwise call (oneDNN's int8 linear, MKL/oneDNN's
fp32 one) and keeps the faster. A call of oneDNN's int8 linear costs about 20-25 us besides its arithmetic
(measured first, ``op_costs``), which is much of the time of the small products of MobileViT's transformer blocks at
batch 1; the generated GEMM is part of the program. Each model is compiled with and without it, in fp32
(a static batch) and, where torchao is installed, as the int8 PT2E program (with activation tables where the model
has SiLU or GELU and the table kernel builds); the forms are timed interleaved (one call of each per round); the
median and the 25th percentile are recorded, with the compile times and the errors: fp32 against eager, the
autotuned int8 program against the plain one on the fp32 output's scale (the same quantized arithmetic, up to
requantization rounding; an int8 program with random weights against fp32 says nothing, its accuracy is checked on
real digits by ``benchmarks/peers/int8_mnist.py``).
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from vitkit.bench.allocator import tune_allocator
from vitkit.bench.speed import build_timed, file_model_rows, interleaved_quartiles, model_rows_parser, random_case
from vitkit.kernels import lut
from vitkit.routes import compile_frozen, quantize_pt2e_int8, rel_err

HERE = Path(__file__).resolve().parent
MODELS = ["mobilevit_xs", "vit_small_patch16_224"]


def _us(fn, *args, n: int = 200) -> float:
    """Median microseconds of ``fn(*args)`` over ``n`` calls, after 10 untimed ones."""
    for _ in range(10):
        fn(*args)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e6)
    return round(statistics.median(times), 1)


def op_costs() -> dict:
    """What one call of oneDNN's int8 linear and convolution (the ops an int8 program calls, ``torch.ops.onednn``)
    costs against the fp32 op, at a size where the call is all overhead and at MobileViT-XS's own shapes (batch 1;
    uint8 activations, per-channel int8 weights, uint8 out; the convolutions channels-last): microseconds, median."""
    onednn, rows = torch.ops.onednn, {}
    g = torch.Generator().manual_seed(0)
    for m, k, n in ((1, 16, 16), (64, 144, 144), (256, 120, 360), (1024, 96, 288)):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        w_scale, w_zp = torch.rand(n, generator=g) * 0.01 + 1e-3, torch.zeros(n, dtype=torch.int64)
        packed, bias = onednn.qlinear_prepack(w, [m, k]), torch.randn(n, generator=g)
        x, xf, wf = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g), torch.randn(m, k), torch.randn(n, k)
        rows[f"linear {m}x{k} -> {n}"] = {
            "int8 us": _us(onednn.qlinear_pointwise, x, 0.02, 128, packed, w_scale, w_zp, bias, 0.05, 100,
                           torch.uint8, "none", [None], ""),
            "fp32 us": _us(torch.nn.functional.linear, xf, wf, bias),
        }  # fmt: skip
    for c, o, hw, k, groups in ((8, 8, 4, 1, 1), (32, 128, 128, 1, 1), (48, 192, 64, 1, 1), (192, 192, 64, 3, 192)):
        w = torch.randint(-127, 128, (o, c // groups, k, k), dtype=torch.int8, generator=g)
        w_scale, w_zp = torch.rand(o, generator=g) * 0.01 + 1e-3, torch.zeros(o, dtype=torch.int64)
        pad, shape = [k // 2] * 2, [1, c, hw, hw]
        packed = onednn.qconv_prepack(w, w_scale, 0.02, 128, [1, 1], pad, [1, 1], groups, shape)
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).contiguous(memory_format=torch.channels_last)
        xf, wf = torch.randn(shape).contiguous(memory_format=torch.channels_last), torch.randn(o, c // groups, k, k)
        bias = torch.randn(o, generator=g)
        rows[f"conv {c} -> {o}, {k}x{k}, groups {groups}, {hw}x{hw}"] = {
            "int8 us": _us(onednn.qconv_pointwise, x, 0.02, 128, packed, w_scale, w_zp, bias, [1, 1], pad, [1, 1],
                           groups, 0.05, 100, torch.uint8, "none", [None], ""),
            "fp32 us": _us(torch.nn.functional.conv2d, xf, wf, bias, 1, k // 2, 1, groups),
        }  # fmt: skip
    print("op costs", json.dumps(rows), flush=True)
    return rows


def model_row(name: str, batch: int, rounds: int, fp32: bool, int8: bool) -> dict:
    model, x, calibration = random_case(name, batch)
    tables = lut.tables_apply(model)
    kind = "int8 tables" if tables else "int8"
    builds = {}
    for tuned, label in ((False, "plain"), (True, "GEMM autotune")):
        if fp32:
            builds[f"fp32, {label}"] = lambda t=tuned: compile_frozen(model, dynamic=False, gemm_autotune=t)
        if int8:
            builds[f"{kind}, {label}"] = lambda t=tuned: quantize_pt2e_int8(
                model, x, calibration, tables=tables, gemm_autotune=t
            )
    with torch.no_grad():
        ref = model(x)
    forms, outs, compile_s = build_timed(builds, x)
    row = {"compile_s": compile_s, "rel_err": {}}
    for label, out in outs.items():  # fp32 against eager; the autotuned int8 program against the plain one
        form, how = label.split(", ", 1)
        if form == "fp32":
            row["rel_err"][label] = rel_err(out, ref)
        elif how != "plain":  # (on the fp32 output's scale: a random-weight int8 program's own may be near 0)
            row["rel_err"][label] = float((out - outs[f"{form}, plain"]).abs().max() / ref.abs().max())
    row["ms"] = interleaved_quartiles(forms, x, rounds)
    for label in forms:
        form, how = label.split(", ", 1)
        if how != "plain":
            ratio = row["ms"][f"{form}, plain"]["median"] / row["ms"][label]["median"]
            row[f"{form}: plain / autotuned (median)"] = round(ratio, 3)
    print(name, batch, json.dumps(row), flush=True)
    return row


def main() -> int:
    p = model_rows_parser(__doc__, MODELS, 41, HERE / "gemm_autotune.json")
    p.add_argument("--no-fp32", action="store_true", help="the int8 programs only")
    p.add_argument("--no-int8", action="store_true", help="fp32 only")
    args = p.parse_args()
    tune_allocator()  # as vitkit bench and the peers benchmark run
    int8 = not args.no_int8 and importlib.util.find_spec("torchao") is not None
    row = lambda name, b: model_row(name, b, args.rounds, not args.no_fp32, int8)  # noqa: E731
    before = {"op_costs": op_costs} if int8 else None
    file_model_rows(args.out, args.models, args.batches, row, args.note, before)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
