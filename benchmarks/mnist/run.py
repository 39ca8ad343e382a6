"""Real MNIST results of `vitkit train` (issue: training and evaluation).

Each recipe in configs/mnist_*.yaml trains on the first 8,000 digits of ../shared/data/mnist (the MNIST test
split) and is evaluated on the last 2,000, with `vitkit train` exactly as a user runs it, in fp32 and with
bf16 autocast. Recorded per run: best and final held-out top-1, wall time of the whole command (start-up,
data, training, every per-epoch evaluation, checkpoints), training images/s, and the time to reach 97%.

    python benchmarks/mnist/run.py                          # every recipe, fp32 and bf16 -> results.json
    python benchmarks/mnist/run.py --only mnist_vit --amp none
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def run_one(recipe: Path, amp: str, out_root: Path, extra: list[str]) -> dict:
    out = out_root / f"{recipe.stem}-{amp}"
    cmd = [
        sys.executable,
        "-m",
        "vitkit",
        "train",
        "--config",
        str(recipe.relative_to(REPO)),
        "--output",
        str(out),
        "--set",
        f"train.amp={amp}",
        "--set",
        "train.progress=false",
        "--json",
        *extra,
    ]
    if out.exists():
        sys.exit(f"{out} exists; remove it or pass another --out")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return summarise(out, recipe.stem, amp, "vitkit " + " ".join(cmd[3:]), wall)


def summarise(out: Path, recipe: str, amp: str, command: str, wall: float) -> dict:
    """One results row from a finished run folder (metrics.jsonl, config.yaml, eval.json)."""
    summary = json.loads((out / "eval.json").read_text())["summary"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    elapsed, first97, best = 0.0, None, (0.0, None)
    for r in epochs:
        elapsed += r["seconds"]
        acc = max(r.get("val_top1") or 0, r.get("ema_top1") or 0)  # raw or EMA weights, whichever is better
        best = max(best, (acc, r["epoch"]))
        if first97 is None and acc >= 0.97:
            first97 = {"epoch": r["epoch"], "train_seconds": round(elapsed, 1)}
    run_cfg = yaml.safe_load((out / "config.yaml").read_text())
    return {
        "recipe": recipe,
        "amp": amp,
        "model": summary["model"],
        "model_kwargs": run_cfg["model"]["kwargs"],
        "command": command,
        "best_top1": best[0],
        "best_epoch": best[1],
        "final_top1": summary["final_top1"],
        "final_ema_top1": summary["final_ema_top1"],
        "epochs": summary["epochs"],
        "wall_seconds": round(wall, 1),
        "train_img_per_s": round(sum(r["img_per_s"] for r in epochs) / len(epochs), 1),
        "first_97": first97,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="recipe stems (default: every configs/mnist_*.yaml)")
    ap.add_argument("--amp", nargs="*", default=["none", "bf16"])
    ap.add_argument("--out", default=str(REPO / "runs" / "bench-mnist"), help="where the runs go (not committed)")
    ap.add_argument("--results", default=str(HERE / "results.json"))
    ap.add_argument("--set", action="append", default=[], help="extra --set overrides for every run")
    ap.add_argument("--summarise-only", action="store_true", help="rebuild the rows from existing run folders")
    args = ap.parse_args(argv)
    recipes = sorted((REPO / "configs").glob("mnist_*.yaml"))
    if args.only:
        recipes = [r for r in recipes if r.stem in args.only]
    extra = [x for s in args.set for x in ("--set", s)]
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    import torch

    results["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for recipe in recipes:
        for amp in args.amp:
            if args.summarise_only:
                old = next((r for r in results["runs"] if (r["recipe"], r["amp"]) == (recipe.stem, amp)), None)
                out = Path(args.out) / f"{recipe.stem}-{amp}"
                if old is None or not out.is_dir():
                    continue
                row = summarise(out, recipe.stem, amp, old["command"], old["wall_seconds"])
            else:
                row = run_one(recipe, amp, Path(args.out), extra)
            results["runs"] = [r for r in results["runs"] if (r["recipe"], r["amp"]) != (recipe.stem, amp)] + [row]
            path.write_text(json.dumps(results, indent=2))
            print(
                f"{row['recipe']:<16} {amp:<5} best {row['best_top1']:.4f} (epoch {row['best_epoch']}) "
                f"final {row['final_top1']:.4f}  wall {row['wall_seconds']:.0f}s  {row['train_img_per_s']:.0f} img/s"
                f"  97% at {row['first_97']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
