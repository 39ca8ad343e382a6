"""LaViT benchmarks: cost against all-vanilla twins, attention saturation, and the DP loss's effect.

    python benchmarks/lavit/run.py                 # all parts; writes results.json beside this file
    python benchmarks/lavit/run.py --parts cost    # only the MACs / CPU forward-time table

Parts:
* cost: MACs and CPU forward time (batch 1, fp32, median of 20 alternating repeats) of every registered LaViT and
  of the same architecture with every layer vanilla attention, at 224 and 384 px.
* train: a small isotropic LaViT (32 px MNIST digits, 4x4 patches: 64 tokens, width 96, 3 groups of 1 vanilla + 2
  less-attention blocks) trained with and without the DP loss, and its all-vanilla twin, on the first 8,000 digits
  of ../shared/data/mnist (last 2,000 held out), same recipe (AdamW 1e-3, wd 0.05, batch 64, cosine, seed 0).
  DP weights 1.0 and 0.1 and none. Reports held-out accuracy; attention saturation (mean cosine similarity of
  consecutive layers' attention maps) at initialisation and after training; and, for the LA layers, symmetry
  (mean |P - P^T|) and diagonal dominance (mean P_ii, and the share of rows whose largest entry is the diagonal).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitkit
from vitkit.bench import count_macs, count_params
from vitkit.data.mnist import MNIST
from vitkit.interpret import attention_similarity
from vitkit.models.lavit import _HIER, _ISO, LaViT

HERE = Path(__file__).resolve().parent
SMALL = dict(
    img_size=32,
    in_chans=1,
    num_classes=10,
    embed_dims=(96,) * 3,
    num_heads=(3,) * 3,
    depths=(3, 3, 3),
    num_va=(1, 1, 1),
    mlp_ratios=(4,) * 3,
    sr_ratios=(1,) * 3,
    patch_sizes=(4, 1, 1),
)


def forward_ms(models, size, repeats=20):
    """Median batch-1 forward time of each model; the models alternate so drifts in clock speed hit both."""
    x = torch.randn(1, 3, size, size)
    times = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            m.eval()
            for _ in range(3):
                m(x)
        for _ in range(repeats):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                m(x)
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def cost_table():
    rows = []
    for name, cfg in {**_HIER, **_ISO}.items():
        for size in (224, 384):
            row = dict(model=name, img_size=size)
            models = []
            for kind, kw in (("lavit", {}), ("twin", {"num_va": cfg["depths"]})):
                torch.manual_seed(0)
                m = vitkit.create_model(name, img_size=size, **kw)
                row[f"{kind}_params"] = count_params(m)
                row[f"{kind}_gmacs"] = round(count_macs(m) / 1e9, 4)
                models.append(m)
            row["lavit_ms"], row["twin_ms"] = (round(t, 1) for t in forward_ms(models, size))
            row["macs_ratio"] = round(row["lavit_gmacs"] / row["twin_gmacs"], 3)
            row["time_ratio"] = round(row["lavit_ms"] / row["twin_ms"], 3)
            print(row, flush=True)
            rows.append(row)
    return rows


def la_stats(model, x):
    model.eval()
    model.record_attention = True
    with torch.no_grad():
        model(x)
    model.record_attention = False
    rec = model.attention_record
    maps = [r["probs"] for r in rec]
    la = [r["probs"] for r in rec if r["less"]]
    out = dict(saturation=statistics.mean(attention_similarity(maps)))
    if la:
        p = torch.cat(la)
        diag = p.diagonal(dim1=-2, dim2=-1)
        out.update(
            la_symmetry=(p - p.transpose(-2, -1)).abs().mean().item(),
            la_mean_diag=diag.mean().item(),
            la_diag_is_row_max=(p.argmax(-1) == torch.arange(p.shape[-1])).float().mean().item(),
            la_uniform_diag=1 / p.shape[-1],
        )
    return out


def train_one(label, kwargs, dp_weight, data, epochs, seed=0):
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    model = LaViT(**kwargs)
    model.model_name = label
    probe = xte[:256]
    init = la_stats(model, probe)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * math.ceil(len(xtr) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            if dp_weight:
                loss = loss + dp_weight * model.extra_losses()["dp"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    res = dict(
        model=label,
        dp_weight=dp_weight,
        heldout_acc=acc,
        seconds=round(time.perf_counter() - t0),
        params=count_params(model),
        at_init=init,
        trained=la_stats(model, probe),
    )
    print(json.dumps(res), flush=True)
    return res


RUNS = {  # label -> (architecture overrides, DP loss weight)
    "lavit_dp1": ({}, 1.0),
    "lavit_dp0.1": ({}, 0.1),
    "lavit_no_dp": ({}, 0.0),
    "vanilla_twin": ({"num_va": SMALL["depths"]}, 0.0),
}


def train_part(data_root, epochs, runs):
    x, y = MNIST(data_root, "test").tensors()
    x = (F.pad(x, (2, 2, 2, 2)) - 0.1307) / 0.3081
    data = (x[:8000], y[:8000]), (x[8000:], y[8000:])
    return {r: train_one(r, dict(SMALL, **RUNS[r][0]), RUNS[r][1], data, epochs) for r in runs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="cost,train")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"training runs, from {list(RUNS)}")
    ap.add_argument("--data", default=str(HERE.parents[2] / "shared" / "data" / "mnist"))
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 2))
    out = HERE / "results.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = dict(
        platform=platform.platform(),
        processor=platform.processor(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    parts = args.parts.split(",")
    if "cost" in parts:
        results["cost"] = cost_table()
        results["cost_command"] = "python benchmarks/lavit/run.py --parts cost"
    if "train" in parts:
        if not Path(args.data).is_dir():
            sys.exit(f"MNIST files not found at {args.data} (pass --data)")
        train = results.get("train", {})
        if isinstance(train, list):  # an earlier layout: one list of runs
            train = {r["model"]: r for r in train}
        train.update(train_part(Path(args.data), args.epochs, args.runs.split(",")))
        results["train"] = train
        results["train_command"] = f"python benchmarks/lavit/run.py --parts train --epochs {args.epochs} --runs RUNS"
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
