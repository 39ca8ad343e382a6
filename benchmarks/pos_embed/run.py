"""ViT position-embedding study (the ViT paper's appendix D.4) on real MNIST digits, and Axial-ViT vs ViT cost.

(a) The same small ViT (28x28 digits, 7x7 patches: a 4x4 grid of 16 tokens, width 128, depth 4, 4 heads,
    mean-pooled, no class token: ``configs/mnist_vit.yaml``'s model) trained with each position embedding
    (``pos_embed``: none, learn1d, learn2d, relative) and, for the learned absolute ones, each way of adding it
    (``pos_embed_every_layer``: input, every, every_shared): 8 runs with the same seed, data order, recipe and
    number of optimizer steps, on ``test[:TRAIN]`` of ../shared/data/mnist (the MNIST test split). Every top-1 is
    of the final weights on ``test[8000:]`` (2,000 digits), which no run trains on or selects with.
(b) Parameters, GMACs (``vitkit.bench.count_macs``) and CPU img/s at batch 8 (``vitkit.bench`` timing, fp32) of
    Axial-ViT-B/16 vs ViT-B/16 and Axial-ViT-B/32 vs ViT-B/32 at 224 px.

    python benchmarks/pos_embed/run.py --threads 1 --only train --epochs 5 --seed 0   # (a), one seed
    python benchmarks/pos_embed/run.py --threads 1 --only cost                        # (b)
    python benchmarks/pos_embed/run.py --table            # the README's tables from results.json
    python benchmarks/pos_embed/run.py --smoke --threads 1 --out /tmp/pe-smoke --work /tmp/pe-smoke/runs
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import vitkit
from vitkit.bench import count_macs, count_params
from vitkit.bench.allocator import tune_allocator
from vitkit.config import load_config
from vitkit.machine import cpu_line
from vitkit.train import Trainer, evaluate

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
HELD_OUT = "test[8000:]"
MODEL = dict(patch_size=7, embed_dim=128, depth=4, num_heads=4, global_pool="avg", class_token=False)
VARIANTS = [("none", "input")]
VARIANTS += [(pe, every) for pe in ("learn1d", "learn2d") for every in ("input", "every", "every_shared")]
VARIANTS += [("relative", "input")]
COST_PAIRS = [
    ("vit_base_patch16_224", "axial_vit_base_patch16_224"),
    ("vit_base_patch32_224", "axial_vit_base_patch32_224"),
]


def train_one(pos_embed: str, every: str, args) -> dict:
    name = f"{pos_embed}-{every}-seed{args.seed}"
    kwargs = dict(MODEL, pos_embed=pos_embed, pos_embed_every_layer=every)
    batch = 32
    cfg = load_config(None, [
        "model.name=vit_tiny_patch16_224", "model.img_size=28", f"model.kwargs={json.dumps(kwargs)}",
        "data.dataset=mnist", f"data.root={args.mnist}", f"data.train_split=test[:{args.train}]",
        "data.val_split=null", f"data.batch_size={batch}", "data.mean=[0.1307]", "data.std=[0.3081]",
        "aug.crop=pad", "aug.pad=2", "aug.hflip=0.0",
        "optim.name=adamw", "optim.lr=1e-3", "optim.weight_decay=0.05", "optim.clip_grad=1.0",
        f"sched.epochs={args.epochs}", "sched.warmup_epochs=1", "train.ema_decay=0",
        f"train.output={args.work / name}", f"train.threads={args.threads}", "train.progress=false",
        f"train.seed={args.seed}",
    ] + (["train.max_steps=3"] if args.smoke else []))  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    summary = trainer.fit()
    task = trainer.task
    res = evaluate(task, trainer.model, task.dataset(HELD_OUT), trainer.data_config, 500)
    return {
        "pos_embed": pos_embed,
        "pos_embed_every_layer": every,
        "seed": args.seed,
        "params": count_params(trainer.model),
        "steps": summary["global_step"],
        "epochs": args.epochs,
        "batch": batch,
        "top1": res["top1"],
        "held_out_images": res["images"],
        "seconds": time.perf_counter() - t0,
    }


def img_per_s(model: torch.nn.Module, batch: int, seconds: float) -> float:
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model(x)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            model(x)
            n += 1
        return n * batch / (time.perf_counter() - t0)


def cost(args) -> list[dict]:
    out = []
    for pair in COST_PAIRS:
        for name in pair:
            torch.manual_seed(0)
            model = vitkit.create_model(name).eval()
            out.append({
                "model": name,
                "params": count_params(model),
                "gmacs": count_macs(model) / 1e9,
                "img_per_s_batch8": None if args.smoke else img_per_s(model, 8, args.time_s),
            })  # fmt: skip
            print(f"cost: {out[-1]}", flush=True)
    return out


def table(results: dict) -> str:
    """Markdown: held-out top-1 per variant (each seed, mean), and the Axial-ViT vs ViT cost."""
    runs = results.get("pos_embed", {}).get("runs", [])
    seeds = sorted({r.get("seed", 0) for r in runs})
    head = "| pos_embed | pos_embed_every_layer | params | " + " | ".join(f"top-1 seed {s}" for s in seeds)
    lines = [head + " | mean | min-max |", "|---" * (5 + len(seeds)) + "|"]
    for pe, every in VARIANTS:
        rs = {r.get("seed", 0): r for r in runs if (r["pos_embed"], r["pos_embed_every_layer"]) == (pe, every)}
        if not rs:
            continue
        cells = [f"{rs[s]['top1']:.4f}" if s in rs else "-" for s in seeds]
        mean = sum(r["top1"] for r in rs.values()) / len(rs)
        params = next(iter(rs.values()))["params"]
        spread = max(r["top1"] for r in rs.values()) - min(r["top1"] for r in rs.values())
        lines.append(f"| {pe} | {every} | {params:,} | " + " | ".join(cells) + f" | {mean:.4f} | {spread:.4f} |")
    cost_rows = results.get("axial_cost", {}).get("models", [])
    if cost_rows:
        lines += ["", "| model | params | GMACs | img/s (batch 8) |", "|---|---|---|---|"]
        for r in cost_rows:
            ips = "-" if r["img_per_s_batch8"] is None else f"{r['img_per_s_batch8']:.2f}"
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['gmacs']:.2f} | {ips} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    p.add_argument("--train", type=int, default=4000, help="training digits: test[:TRAIN]")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="model init and data order; runs of other seeds are kept")
    p.add_argument("--time-s", type=float, default=10.0, help="timed seconds per model for img/s")
    p.add_argument("--only", choices=("train", "cost"), default=None)
    p.add_argument("--work", type=Path, default=Path("/tmp/vitkit-pos-embed-bench"), help="run folders (not kept)")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--smoke", action="store_true", help="3 steps per training, no timing: checks the script only")
    p.add_argument("--table", action="store_true", help="print the README's tables from results.json and stop")
    args = p.parse_args()
    if args.table:
        print(table(json.loads((args.out / "results.json").read_text())))
        return 0
    tune_allocator()
    torch.set_num_threads(args.threads)
    if args.only != "cost" and args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(f"{args.work} holds earlier runs; remove it or pass another --work")
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() and args.only else {}
    results.update({
        "machine": cpu_line(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": args.threads,
    })  # fmt: skip
    key = (args.only or "all") + (f" seed {args.seed}" if args.only != "cost" else "")
    results.setdefault("commands", {})[key] = " ".join([Path(sys.executable).name, *sys.argv])
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        path.write_text(json.dumps(results, indent=2) + "\n")

    t0 = time.perf_counter()
    if args.only != "cost":
        old = results.get("pos_embed", {}).get("runs", [])
        results["pos_embed"] = {"model": MODEL, "train_split": f"test[:{args.train}]", "held_out": HELD_OUT}
        results["pos_embed"]["runs"] = [r for r in old if r.get("seed", 0) != args.seed]
        for pe, every in VARIANTS:
            results["pos_embed"]["runs"].append(train_one(pe, every, args))
            print(f"train: {results['pos_embed']['runs'][-1]}", flush=True)
            save()
    if args.only != "train":
        results["axial_cost"] = {"input": "1x3x224x224 (MACs), 8x3x224x224 (img/s)", "models": cost(args)}
        save()
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
