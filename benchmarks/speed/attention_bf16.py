"""The int8 programs with their attention in bf16 (``quantize_pt2e_int8(bf16_attention=True)``,
:mod:`vitkit.kernels.attention`) against the same programs with PyTorch's fp32 SDPA.

    OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/speed/attention_bf16.py
    ... attention_bf16.py --models mobilevit_xs --batches 1 --rounds 41

-> ``attention_bf16.json``, one entry per CPU kind (never overwritten by another kind's). Needs torchao and a CPU
with AVX-512 BF16.

Each model's int8 PT2E program as ``optimize``'s ``"pt2e+kernels"`` form builds it (activation tables where the
model has SiLU or GELU, the GEMM autotune where :func:`vitkit.machine.int8_gemm_template` is true) is compiled twice,
with and without the bf16 attention, and the two are timed interleaved (one call of each per round; median and 25th
percentile). The difference between their outputs is recorded on the fp32 output's scale (an int8 program with
random weights against fp32 says nothing; accuracy is checked on real digits by
``benchmarks/peers/int8_mnist.py``). The kernel against SDPA on each attention shape alone is in
``attention_shapes.json`` (``attention_shapes.py``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from vitkit.bench.allocator import tune_allocator
from vitkit.bench.speed import build_timed, file_model_rows, interleaved_quartiles, model_rows_parser, random_case
from vitkit.kernels import attention, lut
from vitkit.machine import int8_gemm_template
from vitkit.routes import quantize_pt2e_int8

HERE = Path(__file__).resolve().parent
MODELS = ["mobilevit_xs", "vit_small_patch16_224"]


def model_row(name: str, batch: int, rounds: int) -> dict:
    model, x, calibration = random_case(name, batch)
    tables, autotune = lut.tables_apply(model), int8_gemm_template()
    builds = {
        label: lambda a=bf16: quantize_pt2e_int8(
            model, x, calibration, tables=tables, gemm_autotune=autotune, bf16_attention=a
        )
        for label, bf16 in (("fp32 SDPA", False), ("bf16 attention", True))
    }
    with torch.no_grad():
        ref = model(x)
    forms, outs, compile_s = build_timed(builds, x)
    row = {"tables": tables, "gemm_autotune": autotune, "compile_s": compile_s}
    diff = (outs["bf16 attention"] - outs["fp32 SDPA"]).abs().max() / ref.abs().max()
    row["max_diff_on_fp32_scale"] = float(diff)
    row["ms"] = interleaved_quartiles(forms, x, rounds)
    row["fp32 SDPA / bf16 attention (median)"] = round(
        row["ms"]["fp32 SDPA"]["median"] / row["ms"]["bf16 attention"]["median"], 3
    )
    print(name, batch, json.dumps(row), flush=True)
    return row


def main() -> int:
    p = model_rows_parser(__doc__, MODELS, 41, HERE / "attention_bf16.json")
    args = p.parse_args()
    if reason := attention.unavailable_reason():
        print(f"attention_bf16.py: vitkit.kernels.attention {reason}")
        return 1
    tune_allocator()  # as vitkit bench and the peers benchmark run
    file_model_rows(args.out, args.models, args.batches, lambda n, b: model_row(n, b, args.rounds), args.note)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
