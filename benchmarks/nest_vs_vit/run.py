"""NesT vs ViT data efficiency on real MNIST digits (NesT paper claim: faster convergence, less data).

Both models see the same data, recipe and budget: the first 8,000 digits of ../shared/data/mnist (the MNIST
test split) to train, the last 2,000 held out; 28x28 digits zero-padded to 32x32; random 32x32 crops of the
4-pixel-padded image as the only augmentation; AdamW (lr 1e-3, wd 0.05), 1 warm-up epoch then cosine;
batch 64; fp32 (bf16 autocast measured slower for these small matrices: NesT 1.14 s vs 0.84 s per
step); seed 0. Held-out accuracy is recorded after every epoch.

    python benchmarks/nest_vs_vit/run.py --epochs 10          # writes results.json, results.csv, curves.png

The training issue (vitkit train) is not landed yet, so this uses a minimal loop of its own.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitkit
from vitkit.bench import count_macs, count_params
from vitkit.data.mnist import MNIST

HERE = Path(__file__).resolve().parent
MODELS = {
    # NesT, CIFAR-style: 2x2-pixel tokens (16x16 grid), 4x4-token blocks, 3 levels (16 / 4 / 1 blocks), width 96
    "nest": (
        "nest_tiny_cifar",
        dict(
            img_size=32,
            patch_size=2,
            num_levels=3,
            embed_dims=(96, 96, 96),
            num_heads=(3, 3, 3),
            depths=(2, 2, 2),
            attn_type="mha",
        ),
    ),
    # ViT of similar parameters and MACs: 4x4 patches (8x8 grid + class token), width 96, depth 9
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=96, depth=9, num_heads=3)),
}


def load_split(root: Path):
    x, y = MNIST(root, "test").tensors()
    x = F.pad(x, (2, 2, 2, 2))  # 28 -> 32
    x = (x - 0.1307) / 0.3081
    return (x[:8000], y[:8000]), (x[8000:], y[8000:])


def random_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded batch (one offset per image)."""
    b = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4), value=float(x.min()))
    dy = torch.randint(0, 9, (b,), generator=g)
    dx = torch.randint(0, 9, (b,), generator=g)
    return torch.stack([padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(b)])


def evaluate(model, x, y, batch=500):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    return correct / len(x)


def train(key: str, data, epochs: int, batch: int, lr: float, seed: int):
    arch, overrides = MODELS[key]
    torch.manual_seed(seed)
    model = vitkit.create_model(arch, num_classes=10, in_chans=1, **overrides)
    info = dict(params=count_params(model), gmacs=count_macs(model, (1, 32, 32)) / 1e9)
    (xtr, ytr), (xte, yte) = data
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in model.no_weight_decay()]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n in model.no_weight_decay()]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(xtr) / batch)
    total, warm = epochs * steps_per_epoch, steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
    )
    g = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        t0, loss_sum = time.perf_counter(), 0.0
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            xb = random_shift(xtr[idx], g)
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
        acc = evaluate(model, xte, yte)
        history.append(
            dict(
                model=key,
                epoch=epoch,
                train_loss=loss_sum / len(xtr),
                heldout_acc=acc,
                epoch_seconds=time.perf_counter() - t0,
            )
        )
        print(
            f"{key} epoch {epoch:2d}  loss {history[-1]['train_loss']:.4f}  held-out acc {acc:.4f}  "
            f"({history[-1]['epoch_seconds']:.0f}s)",
            flush=True,
        )
    return info, history


def epochs_to(history, target):
    return next((h["epoch"] for h in history if h["heldout_acc"] >= target), None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HERE.parents[2] / "shared" / "data" / "mnist"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args(argv)
    if not Path(args.data).is_dir():
        sys.exit(f"MNIST files not found at {args.data} (pass --data)")
    torch.set_num_threads(min(2, os.cpu_count() or 2))
    data = load_split(Path(args.data))
    results = {
        "command": "python " + " ".join([os.path.relpath(__file__, Path.cwd())] + (argv or sys.argv[1:])),
        "machine": dict(
            platform=platform.platform(),
            processor=platform.processor(),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
        ),
        "recipe": vars(args),
        "models": {},
    }
    rows = []
    for key in MODELS:
        info, hist = train(key, data, args.epochs, args.batch, args.lr, args.seed)
        info.update(
            config=MODELS[key][1],
            epochs_to_target=epochs_to(hist, args.target),
            best_heldout_acc=max(h["heldout_acc"] for h in hist),
            seconds=sum(h["epoch_seconds"] for h in hist),
        )
        results["models"][key] = info
        rows += hist
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(dict(results, history=rows), indent=2, default=str))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key in MODELS:
            h = [r for r in rows if r["model"] == key]
            m = results["models"][key]
            ax.plot(
                [r["epoch"] for r in h],
                [r["heldout_acc"] for r in h],
                marker="o",
                label=f"{key} ({m['params'] / 1e6:.2f}M params, {m['gmacs'] * 1e3:.0f} MMACs)",
            )
        ax.axhline(args.target, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("epoch")
        ax.set_ylabel("held-out accuracy (last 2,000 digits)")
        ax.set_title("MNIST, 8,000 training digits, same recipe")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: curves.png not written", file=sys.stderr)
    for key, m in results["models"].items():
        print(
            f"{key}: {m['params']:,} params, {m['gmacs']:.4f} GMACs, epochs to {args.target:.0%}: "
            f"{m['epochs_to_target']}, best {m['best_heldout_acc']:.4f}, {m['seconds']:.0f}s"
        )


if __name__ == "__main__":
    main()
