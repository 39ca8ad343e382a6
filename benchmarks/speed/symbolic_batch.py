"""A static batch size against a symbolic one in vitkit's compiled route (``compile_frozen(symbolic_batch=...)``),
and against ``vitkit.kernels``' oneDNN linears at a static one.

    OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/speed/symbolic_batch.py
    ... symbolic_batch.py --models vit_small_patch16_224 --batches 1 8 --rounds 9

-> ``symbolic_batch.json``, one entry per CPU kind (never overwritten by another kind's).

Inductor lowers an fp32 linear to MKL's packed GEMM (``mkl._mkl_linear``) when the batch size is static and to
oneDNN's (``mkldnn._linear_pointwise``) when it is a symbol; with a symbol it also packs the convolution weights on
every call instead of once. So which form is faster depends on the CPU's two GEMM libraries and on the model's mix of
linears and convolutions. Two parts:

* ``gemm``: the two libraries alone on ViT's linear shapes (tokens x in -> out at batch 1 and 8), GFLOP/s, each
  weight packed for the shape's row count (``vitkit.kernels.linear`` packs without it), timed interleaved;
* ``models``: each model compiled both ways, and at a static batch size with ``vitkit.kernels`` applied (oneDNN
  linears with weights packed once, and the halo kernel in HaloNets), timed interleaved (one call of each per
  round, the median over rounds), outputs compared with eager.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from vitkit import kernels
from vitkit.bench.speed import build_timed, file_model_rows, interleaved, model_rows_parser, random_case
from vitkit.routes import compile_frozen, compile_with_kernels, rel_err

HERE = Path(__file__).resolve().parent
MODELS = ["vit_small_patch16_224", "vit_base_patch16_224", "mobilevit_xs", "halonet26t", "halonet_h1", "nest_tiny_jx"]
GEMM_SHAPES = [(197, 384, 1152), (197, 384, 1536), (197, 1536, 384), (197, 768, 3072), (1576, 384, 1536),
               (1576, 768, 3072), (1576, 3072, 768)]  # fmt: skip


def gemm_rates(rounds: int) -> list[dict]:
    """GFLOP/s of MKL's packed GEMM and oneDNN's linear (the two ops Inductor chooses between) on ViT's shapes."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for m, k, n in GEMM_SHAPES:
        x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        mkl_w = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
        dnn_w = torch.ops.mkldnn._reorder_linear_weight(w, m)
        fns = {
            "mkl": lambda x, mkl_w=mkl_w, w=w, b=b, m=m: torch.ops.mkl._mkl_linear(x, mkl_w, w, b, m),
            "onednn": lambda x, dnn_w=dnn_w, b=b: torch.ops.mkldnn._linear_pointwise(x, dnn_w, b, "none", [], ""),
        }
        ref = torch.addmm(b, x, w.t())
        errs = {name: rel_err(fn(x), ref) for name, fn in fns.items()}
        ms = interleaved(fns, x, rounds, warmup=3)
        row = {"shape": [m, k, n], "gflops": {name: round(2 * m * k * n / t / 1e6, 1) for name, t in ms.items()}}
        row["rel_err"] = errs
        rows.append(row)
        print(row, flush=True)
    return rows


def model_row(name: str, batch: int, rounds: int) -> dict:
    model, x, _ = random_case(name, batch, calibration_batches=0)
    row = {"layers_swapped": kernels.applicable(model)}
    builds = {
        "static": lambda: compile_frozen(model, dynamic=False),
        "symbolic": lambda: compile_frozen(model, dynamic=False, symbolic_batch=True),
        "static, kernels": lambda: compile_with_kernels(model, dynamic=False),
    }
    with torch.no_grad():
        ref = model(x)
    forms, outs, row["compile_s"] = build_timed(builds, x)
    row["rel_err"] = {label: rel_err(out, ref) for label, out in outs.items()}
    ms = interleaved(forms, x, rounds)
    row["ms"] = {k: round(v, 2) for k, v in ms.items()}
    row["static_over_symbolic"] = round(ms["static"] / ms["symbolic"], 3)
    row["static_over_kernels"] = round(ms["static"] / ms["static, kernels"], 3)
    print(name, batch, json.dumps(row), flush=True)
    return row


def main() -> int:
    p = model_rows_parser(__doc__, MODELS, 9, HERE / "symbolic_batch.json")
    p.add_argument("--no-gemm", action="store_true", help="skip the GEMM rates")
    args = p.parse_args()
    before = {} if args.no_gemm else {"gemm": lambda: gemm_rates(max(args.rounds, 20))}
    row = lambda name, b: model_row(name, b, args.rounds)  # noqa: E731
    file_model_rows(args.out, args.models, args.batches, row, args.note, before)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
