"""Speed targets of the efficiency issue: fp32 MFU at batch 16 and the bf16 speed-up, per family.

For each family's default-size model: fp32 inference at batch 16 (images/s, achieved fraction of the
measured fp32 matmul peak), bf16 inference (the faster of autocast and bf16 weights) and its speed-up over
fp32, batch-1 latency, peak memory. Then bf16 top-1 agreement with fp32 on real images: the 2,000
held-out MNIST digits through the models trained by benchmarks/mnist (if their runs exist).

    python benchmarks/speed/run.py                 # -> results.json (speed malloc, faster layout, BN folded)
    python benchmarks/speed/run.py --malloc default --layout nchw --out benchmarks/speed/results_baseline.json
    python benchmarks/speed/run.py --models vit_base_patch16_224 --batch 16

Each model runs in a fresh process.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from vitkit.bench.speed import bench_model, matmul_peak

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# the reference implementation's fp32 fraction of peak on this machine, from the issue
REFERENCE_MFU = {
    "vit_base_patch16_224": 0.47,
    "halonet_h1": 0.03,
    "halonet26t": 0.23,
    "mobilevit_xxs": 0.14,
    "mobilevit_xs": 0.05,
    "nest_tiny_jx": 0.25,
}
BF16_TARGET = {"vit_base_patch16_224": 4.0, "nest_tiny_jx": 3.0}


def target_mfu(name: str) -> float:
    if name == "vit_base_patch16_224":
        return 0.60
    return min(2 * REFERENCE_MFU[name], 0.35)


def agreement(run_dir: Path, runtime: str = "torch") -> dict | None:
    """Top-1 agreement of bf16 with fp32 (eager) on the held-out MNIST digits for a trained run.

    bf16 is autocast in eager (``runtime='torch'``), or the model in bf16 weights traced and frozen with the oneDNN
    Graph fuser (``'torchscript'``, as ``vitkit bench --runtime torchscript`` runs it).
    """
    if not (run_dir / "run.json").is_file():
        return None
    from vitkit.data.datasets import build_dataset
    from vitkit.data.loader import TransformView, eval_plan
    from vitkit.data.transforms import EvalTransform
    from vitkit.export import onednn_graph_fusion, trace_frozen
    from vitkit.train import load_run

    loaded = load_run(run_dir, "best")
    model, dc = loaded.model, loaded.data_config
    ds = build_dataset("mnist", REPO.parent / "shared" / "data" / "mnist", "test[8000:]")
    view = TransformView(ds, EvalTransform.from_data_config(dc), 0)
    size = tuple(dc["input_size"][1:])
    preds = {"fp32": [], "bf16": []}
    labels, traced = [], None
    with torch.no_grad(), onednn_graph_fusion(runtime == "torchscript"):
        for batch in eval_plan(len(ds), 250, size):
            x = torch.stack([view[k][0] for k in batch])
            labels += [ds[k[0]][1] for k in batch]
            preds["fp32"].append(model(x).argmax(1))
            if runtime == "torchscript":
                traced = traced or trace_frozen(copy.deepcopy(model).to(torch.bfloat16), x.to(torch.bfloat16))
                preds["bf16"].append(traced(x.to(torch.bfloat16)).argmax(1))
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    preds["bf16"].append(model(x).argmax(1))
    p32, p16, y = torch.cat(preds["fp32"]), torch.cat(preds["bf16"]), torch.tensor(labels)
    return {
        "run": str(run_dir.relative_to(REPO)),
        "model": loaded.cfg.model.name,
        "runtime": runtime,
        "images": len(y),
        "agreement": (p32 == p16).float().mean().item(),
        "fp32_top1": (p32 == y).float().mean().item(),
        "bf16_top1": (p16 == y).float().mean().item(),
    }


def bench_one(name: str, batch: int, repeats: int, malloc: str, layout: str, fuse_bn: bool) -> dict:
    tune = malloc == "speed"
    opts = dict(batch=batch, layout=layout, repeats=repeats, tune_malloc=tune, fuse_bn=fuse_bn)
    fp32 = bench_model(name, dtype="fp32", **opts).as_dict()
    bf16 = bench_model(name, dtype="bf16", memory=False, **opts).as_dict()
    row = {
        "model": name,
        "img_size": fp32["img_size"],
        "batch": batch,
        "gmacs": fp32["gmacs"],
        "fp32_img_per_s": fp32["img_per_s"],
        "fp32_mfu": fp32["mfu"],
        "fp32_channels_last": fp32["channels_last"],
        "target_mfu": target_mfu(name),
        "reference_mfu": REFERENCE_MFU.get(name),
        "fp32_latency_ms": fp32["latency_ms"],
        "peak_mem_mb": fp32["peak_mem_mb"],
        "bf16_img_per_s": bf16["img_per_s"],
        "bf16_mode": bf16["bf16_mode"],
        "bf16_channels_last": bf16["channels_last"],
        "bf16_speedup": round(bf16["img_per_s"] / fp32["img_per_s"], 2),
        "bf16_target": BF16_TARGET.get(name),
        "allocator": fp32["allocator"],
        "fused_bn": fp32["fused_bn"],
    }
    row["mfu_met"] = row["fp32_mfu"] >= row["target_mfu"]
    row["bf16_met"] = None if row["bf16_target"] is None else row["bf16_speedup"] >= row["bf16_target"]
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(REFERENCE_MFU))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--malloc", default="speed", choices=["speed", "default"], help="glibc policy (vitkit.bench.allocator)"
    )
    ap.add_argument("--layout", default="auto", choices=["auto", "nchw", "channels_last"])
    ap.add_argument("--no-fuse-bn", dest="fuse_bn", action="store_false", help="keep BatchNorm separate")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one model, JSON row on stdout
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench-mnist"), help="trained MNIST runs (agreement)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 2))
    if args.one:
        print(json.dumps(bench_one(args.one, args.batch, args.repeats, args.malloc, args.layout, args.fuse_bn)))
        return
    peaks = {d: matmul_peak(d) / 1e9 for d in ("fp32", "bf16")}
    rows = []
    for name in args.models:  # each model in a fresh process: no allocator or cache state carried between models
        cmd = [sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--repeats", str(args.repeats)]
        cmd += ["--malloc", args.malloc, "--layout", args.layout] + ([] if args.fuse_bn else ["--no-fuse-bn"])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    agree = [a for a in (agreement(p) for p in sorted(Path(args.runs).glob("mnist_*-none"))) if a]
    result = {
        "command": " ".join(["python benchmarks/speed/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "matmul_peak_gflops": peaks,
        },
        "rows": rows,
        "bf16_agreement": agree,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    for a in agree:
        print(json.dumps(a))


if __name__ == "__main__":
    main()
