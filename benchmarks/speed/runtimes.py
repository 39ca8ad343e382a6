"""Eager PyTorch against the TorchScript runtime (traced, frozen, oneDNN Graph fuser), fp32 and bf16, per family.

    .venv/bin/python benchmarks/speed/runtimes.py              # -> runtimes.json, runtimes.md
    .venv/bin/python benchmarks/speed/runtimes.py --models nest_tiny_jx --repeats 5

Each model runs in a fresh process through ``vitkit.bench.speed.bench_model`` at batch 16 with the same settings
as ``run.py`` (speed malloc, the faster layout, BatchNorm folded; bf16 = the faster of autocast and bf16 weights
in eager, bf16 weights in TorchScript). The TorchScript runtime's output is checked against eager before it is
timed. "best bf16 / best fp32" divides the faster runtime of each precision. Then the TorchScript bf16 runtime's
top-1 agreement with fp32 on the 2,000 held-out MNIST digits through the models trained by benchmarks/mnist.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from run import agreement  # this directory's run.py (the script directory is on sys.path)

from vitkit.bench.speed import bench_model
from vitkit.export import ExportError

HERE = Path(__file__).resolve().parent
MODELS = [
    "vit_base_patch16_224",
    "halonet_h1",
    "halonet26t",
    "mobilevit_xxs",
    "mobilevit_xs",
    "nest_tiny_jx",
    "lavit_tiny",
]
RUNTIMES = ("torch", "torchscript")


def bench_one(name: str, batch: int, repeats: int) -> dict:
    out = {"model": name}
    for runtime in RUNTIMES:
        for dtype in ("fp32", "bf16"):
            try:
                row = bench_model(
                    name, batch=batch, dtype=dtype, runtime=runtime, repeats=repeats, fuse_bn=True, memory=False
                )
            except (RuntimeError, ExportError) as e:  # a runtime that cannot run the model, or computes wrongly
                out[f"{runtime}_{dtype}"] = {"error": str(e).splitlines()[0][:300]}
                continue
            out[f"{runtime}_{dtype}"] = {
                "img_per_s": row.img_per_s,
                "latency_ms": row.latency_ms,
                "channels_last": row.channels_last,
                "bf16_mode": row.bf16_mode,
            }
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| model | fp32 eager img/s | fp32 TorchScript img/s (x eager) | bf16 eager img/s | "
        "bf16 TorchScript img/s (x eager) | bf16/fp32 eager | bf16/fp32 TorchScript | best bf16 / best fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        keys = ("torch_fp32", "torchscript_fp32", "torch_bf16", "torchscript_bf16")
        f, fj, b, bj = (r[k].get("img_per_s") for k in keys)

        def ts(v, eager):
            return "refused (see below)" if v is None else f"{v:.2f} ({v / eager:.2f}x)"

        def ratio(num, den):
            return "-" if num is None or den is None else f"{num / den:.2f}x"

        best_b, best_f = max(v for v in (b, bj) if v is not None), max(v for v in (f, fj) if v is not None)
        lines.append(
            f"| {r['model']} | {f:.2f} | {ts(fj, f)} | {b:.2f} | {ts(bj, b)} "
            f"| {ratio(b, f)} | {ratio(bj, fj)} | {best_b / best_f:.2f}x |"
        )
        notes += [f"- {r['model']}, {k}: {v['error']}" for k, v in r.items() if isinstance(v, dict) and "error" in v]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "runtimes.json"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one model, JSON row on stdout
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 2))
    if args.one:
        print(json.dumps(bench_one(args.one, args.batch, args.repeats)))
        return
    rows = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    runs = sorted((HERE.parents[1] / "runs" / "bench-mnist").glob("mnist_*-none"))
    agree = [a for a in (agreement(p, "torchscript") for p in runs) if a]
    command = " ".join(["python benchmarks/speed/runtimes.py", *(sys.argv[1:] if argv is None else argv)])
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": 2, "torch": torch.__version__}
    result = {"command": command, "machine": machine, "rows": rows, "bf16_agreement": agree}
    Path(args.out).write_text(json.dumps(result, indent=2))
    text = f"{command}  (torch {torch.__version__}, {machine['threads']} threads, batch {args.batch})\n\n" + table(rows)
    text += "\nTorchScript bf16 (weights) top-1 agreement with fp32 eager, 2,000 held-out MNIST digits:\n\n"
    text += (
        "\n".join(
            f"- {a['model']} ({a['run']}): {100 * a['agreement']:.2f}% (top-1 fp32 {100 * a['fp32_top1']:.2f}%, "
            f"bf16 {100 * a['bf16_top1']:.2f}%)"
            for a in agree
        )
        + "\n"
    )
    Path(args.out).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
