"""Inductor's C++ wrapper against its Python wrapper in vitkit's compiled routes (``compile_frozen(cpp_wrapper=...)``).

    OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/speed/cpp_wrapper.py
    ... cpp_wrapper.py --models mobilevit_xs --batches 1 8 --rounds 41 [--no-int8]

-> ``cpp_wrapper.json``, one entry per CPU kind (never overwritten by another kind's).

The generated kernels are the same either way; what differs is the code that calls them, hundreds of calls per
forward (more in an int8 program, with its quantize/dequantize steps and activation tables): Python, or C++ compiled
with the program. Each model is compiled both ways in fp32 (a static batch) and, where torchao is installed, as the
int8 PT2E program (with activation tables where the model has SiLU or GELU and the table kernel builds, else plain)
both ways, and a third time with the C++ wrapper and Dynamo's guards on the program's modules, which
``quantize_pt2e_int8`` leaves out (``compile_frozen(module_guards=False)``). The forms are timed interleaved (one
call of each per round, so the VM's drift falls on all alike); the median and the 25th percentile over the rounds
are recorded, with the compile times and the errors: fp32 against eager, the other int8 programs against the Python
wrapper's (the same kernels, so the same output; an int8 program with random weights against fp32 says nothing, its
accuracy is checked on real digits by ``benchmarks/peers/int8_mnist.py``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from vitkit.bench.allocator import tune_allocator
from vitkit.bench.speed import build_timed, file_model_rows, interleaved_quartiles, model_rows_parser, random_case
from vitkit.kernels import lut
from vitkit.routes import compile_frozen, quantize_pt2e_int8, rel_err

HERE = Path(__file__).resolve().parent
MODELS = ["vit_small_patch16_224", "mobilevit_xs", "halonet26t", "nest_tiny_jx"]


def model_row(name: str, batch: int, rounds: int, int8: bool) -> dict:
    model, x, calibration = random_case(name, batch)
    tables = lut.tables_apply(model)
    builds = {f"fp32, {w}": (lambda c=c: compile_frozen(model, dynamic=False, cpp_wrapper=c))
              for w, c in (("C++", True), ("Python", False))}  # fmt: skip
    if int8:  # the int8 program also with Dynamo's module guards, which quantize_pt2e_int8 leaves out
        kind = "int8 tables" if tables else "int8"
        for w, c, guards in (("C++", True, False), ("Python", False, False), ("C++ + module guards", True, True)):
            builds[f"{kind}, {w}"] = lambda c=c, guards=guards: quantize_pt2e_int8(
                model, x, calibration, tables=tables, cpp_wrapper=c, module_guards=guards
            )
    with torch.no_grad():
        ref = model(x)
    forms, outs, compile_s = build_timed(builds, x)
    row = {"compile_s": compile_s, "rel_err": {}}
    for label, out in outs.items():  # fp32 against eager; int8 (random weights) against the Python wrapper's int8
        kind, wrapper = label.split(", ", 1)
        other = outs[f"{kind}, Python"] if kind != "fp32" else ref
        row["rel_err"][label] = rel_err(out, other) if kind == "fp32" or wrapper != "Python" else None
    row["ms"] = interleaved_quartiles(forms, x, rounds)
    ms = row["ms"]
    for label in forms:
        kind, wrapper = label.split(", ", 1)
        if wrapper != "Python":
            ratio = ms[f"{kind}, Python"]["median"] / ms[label]["median"]
            row[f"{kind}: Python / {wrapper} (median)"] = round(ratio, 3)
    print(name, batch, json.dumps(row), flush=True)
    return row


def main() -> int:
    p = model_rows_parser(__doc__, MODELS, 41, HERE / "cpp_wrapper.json")
    p.add_argument("--no-int8", action="store_true", help="fp32 only")
    args = p.parse_args()
    tune_allocator()  # as vitkit bench and the peers benchmark run
    int8 = not args.no_int8 and importlib.util.find_spec("torchao") is not None
    row = lambda name, b: model_row(name, b, args.rounds, int8)  # noqa: E731
    file_model_rows(args.out, args.models, args.batches, row, args.note)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
