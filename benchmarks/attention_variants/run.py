"""Less attention with other attention types (LaViT's "works with other attentions" table, in kind).

    OMP_NUM_THREADS=1 python benchmarks/attention_variants/run.py                  # cost + train; writes results.json
    OMP_NUM_THREADS=1 python benchmarks/attention_variants/run.py --parts cost     # only params / GMACs / img/s
    OMP_NUM_THREADS=1 python benchmarks/attention_variants/run.py --parts train --steps 3   # time a few steps

For PVT-T (spatial-reduction attention) and Swin-T (shifted-window attention), each as registered and with
``less_attention=True`` (LaViT's less-attention layers on PVT's reduced keys / on Swin's windows):

* cost: parameters and GMACs (``vitkit.bench.count_params`` / ``count_macs``, 224 px, 3 channels, 1000 classes),
  and CPU inference throughput at batch 8 (fp32, 1 thread, median of alternating repeats);
* train: held-out top-1 on real MNIST digits after the same short budget: 64 px inputs (digits padded to 32 px,
  upsampled 2x), one channel, 10 classes, Swin with 4 x 4 windows (so that the 16/8/4/2 token grids tile without
  padding), no stochastic depth, AdamW 1e-3 (wd 0.05), batch 32, one-cycle schedule, seed 0; the first ``--train``
  digits of ``../shared/data/mnist`` (the MNIST test split) train, the last 2,000 are held out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitkit
from vitkit.bench import count_macs, count_params
from vitkit.data.mnist import MNIST
from vitkit.machine import cpu_line

HERE = Path(__file__).resolve().parent
MODELS = {  # label -> (registered name, constructor arguments)
    "pvt_tiny": ("pvt_tiny", {}),
    "pvt_tiny+less": ("pvt_tiny", {"less_attention": True}),
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}),
    "swin_tiny+less": ("swin_tiny_patch4_window7_224", {"less_attention": True}),
}
SMALL = dict(img_size=64, in_chans=1, num_classes=10, drop_path_rate=0.0)
SMALL_SWIN = dict(window_size=4)


def img_per_s(models: list[torch.nn.Module], batch: int = 8, size: int = 224, repeats: int = 5) -> list[float]:
    """Batch-``batch`` inference throughput; the models alternate so drifts in load hit each alike."""
    x = torch.randn(batch, 3, size, size)
    times = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            m.eval()(x)
        for _ in range(repeats):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                m(x)
                times[i].append(time.perf_counter() - t0)
    return [batch / statistics.median(t) for t in times]


def cost_part() -> list[dict]:
    rows, models = [], []
    for label, (name, kw) in MODELS.items():
        torch.manual_seed(0)
        m = vitkit.create_model(name, **kw)
        rows.append(dict(model=label, params_m=round(count_params(m) / 1e6, 3), gmacs=round(count_macs(m) / 1e9, 3)))
        models.append(m)
    for row, ips in zip(rows, img_per_s(models)):
        row["img_per_s_batch8"] = round(ips, 2)
        print(json.dumps(row), flush=True)
    return rows


def digits(root: Path, n_train: int) -> tuple:
    x, y = MNIST(root, "test").tensors()  # (10000, 1, 28, 28) in [0, 1]
    x = F.interpolate(F.pad(x, (2, 2, 2, 2)), scale_factor=2, mode="bilinear", align_corners=False)
    x = (x - 0.1307) / 0.3081
    return (x[:n_train], y[:n_train]), (x[-2000:], y[-2000:])


def train_one(label: str, data, steps: int, batch: int = 32, seed: int = 0) -> dict:
    (xtr, ytr), (xte, yte) = data
    name, kw = MODELS[label]
    torch.manual_seed(seed)
    model = vitkit.create_model(name, **SMALL, **kw, **(SMALL_SWIN if name.startswith("swin") else {}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(xtr), generator=g) for _ in range(math.ceil(steps * batch / len(xtr)))])
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(steps):
        idx = order[s * batch : (s + 1) * batch]  # epochs of shuffled digits, one after another
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xte[i : i + 250]).argmax(1) for i in range(0, len(xte), 250)])
    res = dict(
        model=label,
        steps=steps,
        batch=batch,
        epochs=round(steps * batch / len(xtr), 2),
        heldout_top1=round((pred == yte).float().mean().item(), 4),
        last_loss=round(loss.item(), 4),
        train_seconds=round(train_s),
        train_cpu_seconds=round(train_cpu),  # CPU time of this process (the wall time includes others' load)
        params_m=round(count_params(model) / 1e6, 3),
    )
    print(json.dumps(res), flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="cost,train")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per model")
    ap.add_argument("--train", type=int, default=4000, help="training digits (the last 2,000 are held out)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--data", default=str(HERE.parents[2] / "shared" / "data" / "mnist"))
    ap.add_argument("--out", default=str(HERE / "results.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["cpu"] = cpu_line()
    parts = args.parts.split(",")
    if "cost" in parts:
        results["cost"] = cost_part()
        results["cost_command"] = "OMP_NUM_THREADS=1 python benchmarks/attention_variants/run.py --parts cost"
    if "train" in parts:
        if not Path(args.data).is_dir():
            sys.exit(f"MNIST files not found at {args.data} (pass --data)")
        data = digits(Path(args.data), args.train)
        train = results.get("train", {})
        for label in args.models.split(","):
            train[label] = train_one(label, data, args.steps)
        results["train"] = train
        results["train_command"] = (
            f"OMP_NUM_THREADS=1 python benchmarks/attention_variants/run.py --parts train --steps {args.steps} "
            f"--train {args.train}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
