"""ViT masked patch prediction on real MNIST digits: what self-supervised pre-training gives with few labels.

The ViT paper (appendix B.1.2) reports +2% on ImageNet for ViT-B/16 pre-trained by masked patch prediction over
training from scratch. Here, on ../shared/data/mnist (the MNIST test split, 10,000 digits), with one small ViT
(``configs/ssl_masked_patch_vit.yaml``: 28x28 digits, 4x4 patches, width 128, depth 4, mean-pooled, 0.8M params):

* **pre-training**: ``vitkit train --config configs/ssl_masked_patch_vit.yaml`` (the ``masked_patch`` task) on the
  first 9,000 digits, labels unused; the last checkpoint is used (the held-out colour accuracy is logged, never used
  to pick anything);
* **fine-tuning**: the same ViT as a 10-way classifier trained on the first 100 / 1,000 of those digits with their
  labels, from the pre-trained weights (``model.checkpoint=<run>/checkpoints/last``) and from scratch: same seed,
  recipe and number of steps; the final weights are scored;
* **few-shot linear probe** (``vitkit.train.linear_probe``, as ``vitkit eval --linear-probe``): 1 / 5 / 10 digits per
  class drawn from the first 9,000 (5 seeds), closed-form least squares on the frozen features of the pre-trained
  encoder and of the same encoder at its random initialisation (the pre-training's starting point);
* every accuracy is measured on the last 1,000 digits (``test[9000:]``), which no step trains on or selects with.

    python benchmarks/ssl/run.py                 # about 15 minutes on 2 cores; writes results.json beside itself
    python benchmarks/ssl/run.py --smoke --threads 1 --out /tmp/ssl-smoke --work /tmp/ssl-smoke/runs   # the script
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from vitkit.bench.allocator import tune_allocator
from vitkit.config import load_config
from vitkit.machine import cpu_line
from vitkit.train import Trainer, evaluate, linear_probe, load_run

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RECIPE = REPO / "configs" / "ssl_masked_patch_vit.yaml"
TRAIN, HELD_OUT = "test[:9000]", "test[9000:]"
SHOTS, PROBE_SEEDS = [1, 5, 10], 5


def pretrain(args) -> tuple[Path, dict]:
    run = args.work / "pretrain"
    sets = [f"data.root={args.mnist}", f"sched.epochs={args.pretrain_epochs}", f"train.output={run}",
            f"train.threads={args.threads}", "train.progress=false"]  # fmt: skip
    cfg = load_config(RECIPE, sets + (["train.max_steps=3"] if args.smoke else []))
    assert cfg.data.train_split == TRAIN and cfg.data.val_split == HELD_OUT, "the recipe's split changed"
    t0 = time.perf_counter()
    summary = Trainer(cfg).fit()
    final = json.loads((run / "eval.json").read_text())
    keep = ("colour_acc", "majority_acc", "per_kind_acc", "loss", "corrupted_patches")
    return run, {
        "epochs": args.pretrain_epochs,
        "steps": summary["global_step"],
        "seconds": time.perf_counter() - t0,
        "train_img_per_s": summary["img_per_s"],
        "held_out": {k: final[k] for k in keep},
    }


def probes(run: Path, args) -> dict:
    """1/5/10-shot accuracy on frozen features: the pre-trained encoder vs the same one at initialisation."""
    trained = load_run(run, "last")
    task, cfg = trained.task, trained.cfg
    torch.manual_seed(cfg.train.seed)  # the Trainer seeds the same way before it builds the model
    initial = task.build_model(initial_weights=False).eval()
    shot_set, held_out = task.dataset(TRAIN), task.dataset(HELD_OUT)
    out = {}
    for name, model in (("pretrained", trained.model), ("random_init", initial)):
        t0 = time.perf_counter()
        seeds = 1 if args.smoke else PROBE_SEEDS
        res = linear_probe(task, model, shot_set, held_out, trained.data_config, SHOTS, seeds=seeds)
        out[name] = dict(res, seconds=time.perf_counter() - t0)
    return out


def finetune(labels: int, init: Path | None, args) -> dict:
    """A classifier of the recipe's ViT on the first ``labels`` digits, from ``init`` (a checkpoint folder) or from
    scratch, for ``args.ft_steps`` optimizer steps; top-1 of the final weights on the held-out digits."""
    recipe = load_config(RECIPE)
    batch = min(32, labels // 5)
    steps_per_epoch = labels // batch
    epochs = -(-args.ft_steps // steps_per_epoch)
    name = f"ft{labels}-{'ssl' if init else 'scratch'}"
    cfg = load_config(None, [
        f"model.name={recipe.model.name}", f"model.img_size={recipe.model.img_size}",
        f"model.kwargs={json.dumps(recipe.model.kwargs)}", f"model.checkpoint={init or 'null'}",
        "data.dataset=mnist", f"data.root={args.mnist}", f"data.train_split=test[:{labels}]", "data.val_split=null",
        f"data.batch_size={batch}", "data.mean=[0.1307]", "data.std=[0.3081]", "aug.crop=pad", "aug.pad=2",
        f"optim.lr={args.ft_lr}", "optim.weight_decay=0.05", "optim.clip_grad=1.0",
        f"sched.epochs={epochs}", f"sched.warmup_epochs={max(epochs * 0.05, 1 / steps_per_epoch):.4f}",
        f"train.max_steps={args.ft_steps}", "train.ema_decay=0", f"train.output={args.work / name}",
        f"train.threads={args.threads}", "train.progress=false", "train.seed=0",
    ])  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    summary = trainer.fit()
    task = trainer.task
    res = evaluate(task, trainer.model, task.dataset(HELD_OUT), trainer.data_config, 500)
    return {
        "labels": labels,
        "init": "masked patch pre-training" if init else "scratch",
        "steps": summary["global_step"],
        "epochs": epochs,
        "batch": batch,
        "top1": res["top1"],
        "held_out_images": res["images"],
        "seconds": time.perf_counter() - t0,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--ft-steps", type=int, default=600, help="optimizer steps of every fine-tuning run")
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/vitkit-ssl-bench"), help="run folders (not kept)")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--smoke", action="store_true", help="3 steps per training, 1 probe seed: checks the script only")
    args = p.parse_args()
    if args.smoke:
        args.ft_steps = 3
    tune_allocator()
    torch.set_num_threads(args.threads)
    if args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(f"{args.work} holds earlier runs; remove it or pass another --work")
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": cpu_line(),
        "platform": platform.platform(),
        "recipe": str(RECIPE.relative_to(REPO)),
        "splits": {"train": TRAIN, "held_out": HELD_OUT},
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        (args.out / "results.json").write_text(json.dumps(results, indent=2))

    t0 = time.perf_counter()
    run, results["pretrain"] = pretrain(args)
    print(f"pre-training: {results['pretrain']}", flush=True)
    save()
    results["linear_probe"] = probes(run, args)
    for name, r in results["linear_probe"].items():
        print(f"probe {name}: " + ", ".join(f"{k}-shot {v['accuracy']:.4f}" for k, v in r["shots"].items()))
    save()
    results["finetune"] = []
    for labels in (100, 1000):
        for init in (run / "checkpoints" / "last", None):
            results["finetune"].append(finetune(labels, init, args))
            print(f"fine-tune: {results['finetune'][-1]}", flush=True)
            save()
    results["seconds"] = time.perf_counter() - t0
    save()
    print(f"wrote {args.out / 'results.json'} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
