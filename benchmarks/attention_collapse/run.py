"""Attention collapse on real MNIST digits: ViT vs DeepViT (re-attention) vs LaViT (less attention), same budget.

DeepViT (arXiv 2103.11886) reports that attention maps of deep ViTs become alike across layers ("attention
collapse") and that re-attention keeps them apart; LaViT (arXiv 2406.00427) makes the same claim for less attention
("attention saturation"). Here three 12-block models of the same width (64, 4 heads, MLP ratio 4, 4x4 patches of
the 28x28 digit: 49 patch tokens) are trained with the same recipe and number of steps on the first 8,000 digits of
../shared/data/mnist (the MNIST test split) and measured on the last 2,000, which no step trains on:

* ``vit``: vitkit's ViT (class token);
* ``deepvit``: the same ViT with re-attention (BatchNorm, learned 4x4 head mix) in its last 6 blocks
  (``DeepViT(num_reattn=6, conv_stem=False, scale_adjustment=1)``: nothing else differs from ``vit``);
* ``lavit``: vitkit's isotropic LaViT, 3 groups of 4 blocks, each starting with one vanilla block (mean pooling,
  no class token: LaViT's layout).

For each: held-out top-1, and the cross-layer attention similarity (:func:`vitkit.interpret.attention_collapse`,
DeepViT's column definition, as is and centred, and the row definition) on 500 held-out digits, at initialisation
and trained. Trained weights go to runs/attention_collapse/ (not committed).

    OMP_NUM_THREADS=1 python benchmarks/attention_collapse/run.py   # 800 steps x 32: results.json, 2 PNGs; ~11 CPU-min
    OMP_NUM_THREADS=1 python benchmarks/attention_collapse/run.py --steps 3 --out /tmp/collapse   # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitkit
from vitkit.bench import count_params
from vitkit.data.mnist import MNIST
from vitkit.interpret import attention_collapse, plot_attention_collapse
from vitkit.machine import cpu_line

HERE = Path(__file__).resolve().parent
WIDTH, HEADS, DEPTH = 64, 4, 12
MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(patch_size=4, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)),
    "deepvit": (
        "deepvit_s",
        dict(
            patch_size=4, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0, num_reattn=DEPTH // 2,
            reattn_scale=False, scale_adjustment=1.0, conv_stem=False,
        ),
    ),
    "lavit": (
        "lavit_small_patch32_224",
        dict(
            embed_dims=(WIDTH,) * 3, num_heads=(HEADS,) * 3, depths=(4, 4, 4), num_va=(1, 1, 1),
            mlp_ratios=(4,) * 3, sr_ratios=(1,) * 3, patch_sizes=(4, 1, 1),
        ),
    ),
}  # fmt: skip


def build(label: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    name, kwargs = MODELS[label]
    return vitkit.create_model(name, img_size=28, in_chans=1, num_classes=10, **kwargs)


# DeepViT's column similarity as is, its centred form (a correlation: blind to re-attention's BatchNorm shift), rows
MEASURES = {"column": ("column", False), "column_centred": ("column", True), "row": ("row", False)}


def collapse(model, probe) -> dict:
    return {k: attention_collapse(model, probe, axis=a, center=c) for k, (a, c) in MEASURES.items()}


def train(label: str, data, steps: int, batch: int, seed: int, probe, save: Path | None) -> tuple[dict, dict]:
    (xtr, ytr), (xte, yte) = data
    model = build(label, seed)
    at_init = collapse(model, probe)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(xtr), generator=g), 0
    model.train()
    t0 = time.process_time()
    for _ in range(steps):
        if pos + batch > len(perm):
            perm, pos = torch.randperm(len(xtr), generator=g), 0
        idx = perm[pos : pos + batch]
        pos += batch
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    cpu_s = time.process_time() - t0
    model.eval()
    with torch.no_grad():
        acc = torch.cat([model(c).argmax(1) for c in xte.split(500)]).eq(yte).float().mean().item()
    trained = collapse(model, probe)
    if save is not None:  # the trained weights, so the analysis can be redone (runs/ is not committed)
        save.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), save / f"{label}.pt")
    res = dict(
        model=label,
        params=count_params(model),
        steps=steps,
        epochs=round(steps * batch / len(xtr), 2),
        train_cpu_seconds=round(cpu_s, 1),
        final_loss=round(loss.item(), 4),
        heldout_top1=round(acc, 4),
        collapse_at_init={k: v.as_dict() for k, v in at_init.items()},
        collapse_trained={k: v.as_dict() for k, v in trained.items()},
    )
    print(
        json.dumps({k: res[k] for k in ("model", "params", "steps", "train_cpu_seconds", "heldout_top1")}), flush=True
    )
    return res, trained


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HERE.parents[2] / "shared" / "data" / "mnist"))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe", type=int, default=500, help="held-out digits the similarity is measured on")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--save", default=str(HERE.parents[1] / "runs" / "attention_collapse"), help="trained weights")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x, y = MNIST(args.data, "test").tensors()
    x = (x - 0.1307) / 0.3081  # (10000, 1, 28, 28)
    data = (x[:8000], y[:8000]), (x[8000:], y[8000:])
    probe = x[8000 : 8000 + args.probe]
    runs, curves = {}, {}
    for label in args.models.split(","):
        runs[label], trained = train(label, data, args.steps, args.batch, args.seed, probe, Path(args.save))
        curves[label] = trained
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for key, png, what in (
        ("column", "collapse.png", "DeepViT's column cosine similarity"),
        ("column_centred", "collapse_centred.png", "column correlation (centred)"),
    ):
        title = f"held-out MNIST after {args.steps} steps x {args.batch}: {what}"
        plot_attention_collapse({k: v[key] for k, v in curves.items()}, out / png, title)
    result = dict(
        cpu=cpu_line(),
        torch=torch.__version__,
        python=platform.python_version(),
        threads=1,
        recipe=dict(
            optimizer="AdamW lr 1e-3 wd 0.05, one-cycle cosine (10% warm-up), grad clip 1.0",
            batch=args.batch,
            steps=args.steps,
            seed=args.seed,
            train="test[:8000]",
            held_out="test[8000:]",
            probe=f"test[8000:{8000 + args.probe}]",
        ),
        models={k: dict(name=v[0], kwargs=v[1]) for k, v in MODELS.items()},
        runs=runs,
    )
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / 'results.json'}, {out / 'collapse.png'} and {out / 'collapse_centred.png'}")


if __name__ == "__main__":
    main()
