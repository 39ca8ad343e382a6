"""How close the fp32 attention of MobileViT-XS and ViT-S runs to the CPU's fp32 GEMM peak (issue 20).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/speed/attention_shapes.py

-> ``attention_shapes.json``, one entry per CPU kind (never overwritten by another kind's).

PT2E's int8 programs keep attention in fp32 (torchao's flow has no int8 attention for a CPU without AMX), so its
time bounded how fast an int8 model with attention could get, until the bf16 kernel below. For each attention shape
of the two models (sequences x heads x tokens x head dim, per image), ``F.scaled_dot_product_attention`` is timed on
``q``, ``k``, ``v`` laid out as the models' ``qkv`` projection leaves them, and its rate (``4 N^2 d`` flops per
sequence and head: the two matrix products; the softmax's exponentials not counted) set against a large fp32 GEMM
timed in the same process. Where :mod:`vitkit.kernels.attention` runs (AVX-512 BF16), its bf16 attention is timed on
the same ``q``, ``k``, ``v``, interleaved with SDPA (``bf16_kernel_ms_per_layer``, ``sdpa_over_bf16_kernel``), with
its largest difference from SDPA on the output's scale (``bf16_kernel_rel_diff``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vitkit.bench.speed import cpu_stamp, interleaved, matmul_peak, timeit
from vitkit.kernels import attention
from vitkit.machine import cpu_kind

HERE = Path(__file__).resolve().parent
# (model, stage, sequences per image, heads, tokens, head dim, layers); MobileViT-XS at 256 px: one sequence per
# position inside a 2x2 patch, 4 heads on 96/120/144 channels; ViT-S/16 at 224 px
SHAPES = [
    ("mobilevit_xs", "stride 8", 4, 4, 256, 24, 2),
    ("mobilevit_xs", "stride 16", 4, 4, 64, 30, 4),
    ("mobilevit_xs", "stride 32", 4, 4, 16, 36, 3),
    ("vit_small_patch16_224", "all", 1, 6, 197, 64, 12),
]


def _kernel_columns(q, k, v, rounds: int) -> dict:
    """The bf16 kernel against SDPA on one shape, interleaved (medians), and their largest output difference."""
    fns = {
        "sdpa": lambda _: F.scaled_dot_product_attention(q, k, v),
        "bf16": lambda _: attention.attention_bf16(q, k, v),
    }
    ms = interleaved(fns, q, rounds)
    ref = fns["sdpa"](None)
    diff = float((fns["bf16"](None) - ref).abs().max() / ref.abs().max())
    return {
        "sdpa_interleaved_ms": round(ms["sdpa"], 4),
        "bf16_kernel_ms_per_layer": round(ms["bf16"], 4),
        "sdpa_over_bf16_kernel": round(ms["sdpa"] / ms["bf16"], 2),
        "bf16_kernel_rel_diff": round(diff, 5),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--rounds", type=int, default=51)
    p.add_argument("--out", default=str(HERE / "attention_shapes.json"))
    args = p.parse_args()
    peak = matmul_peak("fp32") / 1e9  # GFLOP/s
    kernel = attention.unavailable_reason() is None
    rows = []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in args.batches:
            for model, stage, seqs, heads, n, d, layers in SHAPES:
                qkv = torch.randn(batch * seqs, n, 3, heads, d, generator=g).permute(2, 0, 3, 1, 4)
                q, k, v = qkv.unbind(0)
                ms = 1e3 * timeit(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), 3, args.rounds)
                gflops = 4 * n * n * d * heads * seqs * batch / ms / 1e6
                row = dict(model=model, stage=stage, batch=batch, shape=[batch * seqs, heads, n, d], layers=layers)
                row.update(ms_per_layer=round(ms, 3), ms_model=round(ms * layers, 2), gflops=round(gflops, 1))
                row["share_of_gemm_peak"] = round(gflops / peak, 3)
                if kernel:
                    row.update(_kernel_columns(q, k, v, args.rounds))
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results[cpu_kind()] = dict(cpu_stamp(), fp32_gemm_peak_gflops=round(peak, 1), rows=rows)
    out.write_text(json.dumps(results, indent=1))
    print(f"fp32 GEMM peak {peak:.1f} GFLOP/s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
