"""How much faster can a model get on this CPU? A roofline for the peers table (issue 20).

For each model and batch size: its FLOPs (2 x the multiply-accumulates that ``vitkit.bench.count_macs`` counts,
split by op class with ``torch.utils.flop_counter``), this CPU's fp32 GEMM peak (the fastest of torch's ``mm`` on
square matrices and, on ViT's GEMM shapes, torch's ``addmm`` (MKL) and ONNX Runtime's ``MatMul`` (MLAS), at the
same thread count) and so the **floor**: the time the model would take if every multiply-accumulate ran at that
peak and everything else (norms, activations, softmax, copies) were free. vitkit's frozen compiled form
(``vitkit.routes.compile_frozen``) is timed and profiled (``torch.profiler``, self time per op, three calls) and its
time split into the same classes: linear layers (MKL/oneDNN GEMMs), convolutions (oneDNN), attention (the fused
SDPA kernel) and the rest (Inductor's generated C++ kernels: norms, activations, copies, bias adds). Each class's
achieved GFLOP/s is its FLOPs over its time.

``gain_left`` = compiled time / floor: the most any fp32 form of the model could gain over vitkit's compiled one on
this CPU. With the peers table of this CPU kind (``results_frozen.json``: timm's best of eager and compiled and
vitkit's compiled, measured together), ``ceiling_vs_timm`` = (timm best / vitkit compiled) x gain_left: the largest
ratio any fp32 implementation could show against timm here. Both are bounds, not forecasts (softmax, norms and
copies are never free).

The integer GEMM row measures ONNX Runtime's u8 x s8 ``MatMulInteger`` on the same shapes: an int8 route of a
GEMM-bound model runs at most that much faster than the best fp32 GEMM, whatever the quantizer does.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/peers/headroom.py --threads 1   # -> headroom.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
MODELS = ["vit_small_patch16_224", "vit_base_patch16_224", "mobilevit_xs", "halonet26t", "halonet_h1", "nest_tiny_jx"]
# profiler op name -> class; anything else inside the compiled program is Inductor's generated code ("other")
TIME_CLASSES = {
    "linear": ("mkl::_mkl_linear", "aten::addmm", "aten::mm", "aten::linear", "mkldnn::_linear_pointwise"),
    "conv": ("mkldnn::_convolution_pointwise", "aten::convolution", "aten::mkldnn_convolution"),
    "attention": ("aten::_scaled_dot_product", "aten::bmm"),
}
# flop-counter op -> class (attention is counted on the eager path: its two products are bmm/matmul)
FLOP_CLASSES = {"addmm": "linear", "mm": "linear", "convolution": "conv", "bmm": "attention"}
GEMM_SHAPES = [(1576, 384, 1536), (1576, 768, 3072), (197, 384, 1536), (197, 768, 3072), (2048, 2048, 2048)]


def time_class(op: str) -> str:
    for name, prefixes in TIME_CLASSES.items():
        if op.startswith(prefixes):
            return name
    return "other"


def flops_by_class(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """FLOPs (2 x MACs) of one eager forward, by class; the eager attention path so its products are counted."""
    from vitkit.export import exportable
    from vitkit.layers.attention import use_fused_attn

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), use_fused_attn(False), counter:
        exportable(model)(x)
    out: dict[str, int] = defaultdict(int)
    for op, n in counter.get_flop_counts()["Global"].items():
        out[FLOP_CLASSES.get(str(op).split(".")[-1], "other")] += n
    return dict(out)


def profile_ms(fn, x: torch.Tensor, calls: int = 3) -> tuple[float, dict[str, float]]:
    """Median wall ms per call (5 calls), and ms per call by class from the profiler's self times."""
    with torch.no_grad():
        for _ in range(2):
            fn(x)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
        with torch.profiler.profile() as prof:
            for _ in range(calls):
                fn(x)
    split: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():  # the compiled graph's own self time is its generated kernels: "other"
        split[time_class(ev.key)] += ev.self_cpu_time_total / 1e3 / calls
    return statistics.median(times), dict(split)


def peers_times(table: dict, name: str, batch: int) -> tuple[float | None, float | None]:
    """timm's best of eager and compiled, and vitkit's compiled (ms), in one row of the peers table."""
    row = table.get("models", {}).get(name, {}).get("batches", {}).get(str(batch), {})
    times = [row[k]["ms"] for k in ("timm eager", "timm compile") if row.get(k, {}).get("ms")]
    return (min(times) if times else None), row.get("vitkit compile", {}).get("ms")


def gemm_rates(threads: int) -> list[dict]:
    """Throughput of one GEMM per shape: torch's fp32 ``addmm`` (MKL), ONNX Runtime's fp32 ``MatMul`` and its
    integer ``MatMulInteger`` (u8 activations x s8 weights -> s32; MLAS), timed interleaved."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def session(m: int, k: int, n: int, integer: bool, folder: Path):
        if integer:
            w = numpy_helper.from_array(rng.integers(-64, 64, (k, n), dtype=np.int8), "w")
            node = helper.make_node("MatMulInteger", ["x", "w"], ["y"])
            x_type, y_type = TensorProto.UINT8, TensorProto.INT32
        else:
            w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
            node = helper.make_node("MatMul", ["x", "w"], ["y"])
            x_type = y_type = TensorProto.FLOAT
        graph = helper.make_graph(
            [node],
            "gemm",
            [helper.make_tensor_value_info("x", x_type, [m, k])],
            [helper.make_tensor_value_info("y", y_type, [m, n])],
            [w],
        )
        path = folder / f"{'int8' if integer else 'fp32'}_{m}_{k}_{n}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        x = rng.integers(0, 128, (m, k), dtype=np.uint8) if integer else rng.standard_normal((m, k), dtype=np.float32)
        return lambda: sess.run(None, {"x": x})

    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for m, k, n in GEMM_SHAPES:
            a, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
            fns = {
                "torch_fp32": lambda a=a, w=w, b=b: torch.addmm(b, a, w.t()),
                "onnxruntime_fp32": session(m, k, n, False, Path(tmp)),
                "onnxruntime_int8": session(m, k, n, True, Path(tmp)),
            }
            for f in fns.values():
                f()
            ms: dict[str, list[float]] = {key: [] for key in fns}
            for _ in range(7):  # interleaved
                for key, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    ms[key].append(time.perf_counter() - t0)
            rate = {key: round(2 * m * k * n / statistics.median(v) / 1e9, 1) for key, v in ms.items()}
            rows.append(
                {
                    "shape": [m, k, n],
                    "gflops": rate,
                    "int8_over_best_fp32": round(
                        rate["onnxruntime_int8"] / max(rate["torch_fp32"], rate["onnxruntime_fp32"]), 2
                    ),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    import vitkit
    from vitkit.bench.speed import matmul_peak
    from vitkit.machine import cpu_info, cpu_kind, cpu_line
    from vitkit.routes import compile_frozen

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peers", type=Path, default=HERE / "results_frozen.json", help="peers table with timm's times")
    p.add_argument("--out", type=Path, default=HERE / "headroom.json")
    p.add_argument("--table", action="store_true", help="print the table of this CPU kind in --out and exit")
    args = p.parse_args(argv)
    if args.table:
        table = json.loads(args.out.read_text())[cpu_kind()]
        derive(table)
        print_table(table)
        return 0
    torch.set_num_threads(args.threads)

    info = cpu_info()
    peers = json.loads(args.peers.read_text()).get(info["model"], {}) if args.peers.exists() else {}
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    table = results.setdefault(info["model"], {})  # one table per CPU kind: never overwrite one with another
    table.update(cpu=cpu_line(), cpu_info=info, torch=torch.__version__, peers_torch=peers.get("torch"))
    table["gemm"] = gemm_rates(args.threads)
    table["square_mm_gflops"] = round(matmul_peak("fp32", threads=args.threads) / 1e9, 1)
    rows = table.setdefault("models", {})
    for name in args.models:
        model = vitkit.create_model(name).eval()
        for batch in args.batches:
            x = torch.randn(batch, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0))
            flops = flops_by_class(model, x)
            t0 = time.perf_counter()
            fn = compile_frozen(model, dynamic=False)
            with torch.no_grad():
                fn(x)
            build_s = time.perf_counter() - t0
            ms, split = profile_ms(fn, x)
            best, ours = peers_times(peers, name, batch)
            row = {
                "gflop": round(sum(flops.values()) / 1e9, 3),
                "vitkit_compiled_ms": round(ms, 2),
                "peers_timm_best_ms": best,
                "peers_vitkit_compiled_ms": ours,
                "compile_s": round(build_s, 1),
                "by_class": {
                    c: {
                        "ms": round(split.get(c, 0.0), 2),
                        "gflop": round(flops.get(c, 0) / 1e9, 3),
                        "gflops": round(flops[c] / split[c] / 1e6, 1) if flops.get(c) and split.get(c) else None,
                    }
                    for c in ("linear", "conv", "attention", "other")
                },
            }
            rows.setdefault(name, {})[str(batch)] = row
            print(name, batch, json.dumps(row), flush=True)
            derive(table)
            args.out.write_text(json.dumps(results, indent=1) + "\n")  # after every row: a long run keeps its rows
            torch._dynamo.reset()
    print_table(table)
    return 0


def derive(table: dict) -> None:
    """The peak, and each row's floor, share of the peak, gain left and ceiling against timm (see the docstring).

    The peak is the fastest fp32 multiply-accumulate rate seen on this CPU kind in the table: the GEMM
    microbenchmarks and the linear and convolution classes inside the models. Clock and neighbours move this
    machine's rates by 10-20% between minutes, so a peak measured once, in isolation, can sit below what a model's
    own GEMMs reach later; the largest rate seen keeps the floor a true lower bound.
    """
    rates = [r["gflops"][k] for r in table.get("gemm", []) for k in ("torch_fp32", "onnxruntime_fp32")]
    rates += [
        c["gflops"]
        for rows in table.get("models", {}).values()
        for row in rows.values()
        for name, c in row["by_class"].items()
        if name in ("linear", "conv") and c["gflops"]
    ]
    rates.append(table.get("square_mm_gflops", 0.0))
    peak = max(rates)
    table["peak_gflops"] = peak
    for rows in table.get("models", {}).values():
        for row in rows.values():
            floor = row["gflop"] / peak * 1e3
            row["floor_ms"] = round(floor, 2)
            row["share_of_peak"] = round(floor / row["vitkit_compiled_ms"], 3)
            row["gain_left"] = round(row["vitkit_compiled_ms"] / floor, 2)
            best, ours = row["peers_timm_best_ms"], row["peers_vitkit_compiled_ms"]
            row["ceiling_vs_timm"] = round(best / ours * row["gain_left"], 2) if best and ours else None


def print_table(table: dict) -> None:
    print(f"{table['cpu']}; fp32 peak {table['peak_gflops']} GFLOP/s\n")
    print(
        "| model | batch | GFLOP | floor ms | vitkit compiled ms | share of peak | linear / conv / attention GFLOP/s "
        "| ms in linear / conv / attention / other | gain left | ceiling vs timm |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, rows in table.get("models", {}).items():
        for batch, r in rows.items():
            c = r["by_class"]
            rate = " / ".join(str(c[k]["gflops"] or "-") for k in ("linear", "conv", "attention"))
            split = " / ".join(f"{c[k]['ms']:.0f}" for k in ("linear", "conv", "attention", "other"))
            print(
                f"| {name} | {batch} | {r['gflop']} | {r['floor_ms']} | {r['vitkit_compiled_ms']} | "
                f"{r['share_of_peak']:.0%} | {rate} | {split} | {r['gain_left']}x | {r['ceiling_vs_timm']}x |"
            )
    print(
        "\n| GEMM m x k x n | torch fp32 GFLOP/s | ONNX Runtime fp32 | ONNX Runtime int8 (GOP/s) | int8 / best fp32 |"
    )
    print("| --- | --- | --- | --- | --- |")
    for r in table.get("gemm", []):
        g = r["gflops"]
        print(
            f"| {' x '.join(map(str, r['shape']))} | {g['torch_fp32']} | {g['onnxruntime_fp32']} | "
            f"{g['onnxruntime_int8']} | {r['int8_over_best_fp32']}x |"
        )


if __name__ == "__main__":
    sys.exit(main())
