"""NesT generator vs a DCGAN-style conv generator on real MNIST digits: MNIST-FID against training steps.

The NesT paper says its generator "trains more easily and converges faster than a comparable SAGAN". Here, with
the ``gan`` task of ``vitkit train`` on ../shared/data/mnist (the MNIST test split: the first 8,000 digits train,
unscaled at the centre of a 32x32 canvas; labels unused):

* **generators**: ``nest_gen_tiny`` (``configs/gan_nest_mnist.yaml``) and ``dcgan_gen_tiny``
  (``configs/gan_dcgan_mnist.yaml``), of about the same parameters and multiply-adds (both counted here);
* **same everything else**: the task's spectral-norm conv discriminator (widths 32/64/128), hinge loss, one D then
  one G step per batch of 32, AdamW lr 2e-4 betas (0.5, 0.999) for both, no weight decay, EMA 0.999, seed 0, the
  same number of steps;
* **MNIST-FID**: the Frechet distance on the 128-wide pre-logits of a digit classifier trained by vitkit on the
  same 8,000 digits (``configs/gan_fid_classifier_mnist.yaml``; its held-out top-1 is recorded), between the
  held-out digits ``test[9000:]`` and as many generated images (fixed noise), after every epoch (250 steps), of the
  raw and the EMA generator. Also recorded: the same distance between two sets of *real* digits (``test[:1000]``
  vs ``test[9000:]``), the floor a perfect generator would reach with 1,000 images.

    vitkit train --config configs/gan_fid_classifier_mnist.yaml      # the feature classifier, first
    python benchmarks/generation/run.py --steps 1000                 # both generators; writes results.json, PNGs
    python benchmarks/generation/run.py --steps 4 --out /tmp/gen-smoke --work /tmp/gen-smoke/runs   # the script
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vitkit.config import load_config
from vitkit.data.datasets import build_dataset
from vitkit.machine import cpu_line
from vitkit.tasks.generation import classifier_features, frechet_distance
from vitkit.train import Trainer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RECIPES = {"nest_gen_tiny": "gan_nest_mnist.yaml", "dcgan_gen_tiny": "gan_dcgan_mnist.yaml"}
HELD_OUT, STEPS_PER_EPOCH = "test[9000:]", 250  # 8,000 training digits / batch 32


def count(gen: torch.nn.Module) -> dict:
    with FlopCounterMode(display=False) as f:
        gen.eval()(torch.randn(1, gen.latent_dim))
    return {"params": sum(p.numel() for p in gen.parameters()), "mmacs": f.get_total_flops() / 2e6}


def train(name: str, args) -> dict:
    run = args.work / name
    if run.exists():
        shutil.rmtree(run)
    sets = [f"data.root={args.mnist}", f"data.val_split={HELD_OUT}", f"train.output={run}", "train.progress=false",
            f"train.threads={args.threads}", f"sched.epochs={math.ceil(args.steps / STEPS_PER_EPOCH)}",
            f"train.max_steps={args.steps}", f"task.fid_model={args.fid_model}",
            f"task.sample_every={args.sample_every}"]  # fmt: skip
    cfg = load_config(REPO / "configs" / RECIPES[name], sets)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = Trainer(cfg)
    sizes = {"generator": count(trainer.model.generator),
             "discriminator_params": sum(p.numel() for p in trainer.model.discriminator.parameters())}  # fmt: skip
    trainer.model.train()
    summary = trainer.fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "fid": r["val_fid"], "ema_fid": r.get("ema_fid")}
             for r in rows if r["kind"] in ("epoch", "partial")]  # fmt: skip
    samples = sorted((run / "samples").glob("step_*.png"))  # the EMA generator's (the task's choice)
    for p in samples:
        shutil.copy(p, args.out / f"samples_{name}_{p.stem}.png")
    raw = args.out / f"samples_{name}_step_{summary['global_step']:06d}_raw.png"
    trainer.task.write_samples(trainer.model.generator, raw)  # the raw generator, same fixed noise
    return {
        "recipe": f"configs/{RECIPES[name]}",
        **sizes,
        "steps": summary["global_step"],
        "batch": cfg.data.batch_size,
        "curve": curve,
        "final_fid": curve[-1]["fid"],
        "final_ema_fid": curve[-1]["ema_fid"],
        "best_fid": min(c["fid"] for c in curve),
        "best_ema_fid": min(c["ema_fid"] for c in curve if c["ema_fid"] is not None),
        "nonfinite_steps": summary["nonfinite_steps"],
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "samples": [f"samples_{name}_{p.stem}.png" for p in samples] + [raw.name],
        "features": json.loads((run / "eval.json").read_text())["features"],
    }


def real_floor(args) -> dict:
    """MNIST-FID between two sets of real digits: what a generator equal to the data would score."""
    cfg = load_config(REPO / "configs" / RECIPES["nest_gen_tiny"], [f"data.root={args.mnist}"])
    from vitkit.tasks import build_task

    task = build_task(cfg)
    tf = task.train_transform({"input_size": (1, 32, 32), "interpolation": "bicubic"})
    a, b = (build_dataset("mnist", args.mnist, split) for split in ("test[:1000]", HELD_OUT))
    a, b = (torch.stack([tf(*ds[i])[0] for i in range(len(ds))]) for ds in (a, b))
    feats = classifier_features(args.fid_model, 1, (32, 32))
    return {"train_1000_vs_held_out_1000": frechet_distance(a, b, feats)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--generators", nargs="+", default=list(RECIPES))
    p.add_argument("--fid-model", default=str(REPO / "runs" / "gan_fid_classifier"))
    p.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sample-every", type=int, default=250)
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-generation")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cls_eval = json.loads((Path(args.fid_model) / "eval.json").read_text())
    results = {
        "cpu": cpu_line(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "note": "timings measured on a CPU shared with other jobs (load average above 4 on 2 cores): wall and cpu "
        "seconds are indicative only",
        "fid_classifier": {"run": str(args.fid_model), "held_out_top1": cls_eval["top1"], "held_out": "test[8000:]"},
        "real_vs_real": real_floor(args),
        "generators": {},
    }
    out = args.out / "results.json"
    for name in args.generators:
        results["generators"][name] = train(name, args)
        out.write_text(json.dumps(results, indent=2))
        print(name, json.dumps(results["generators"][name]["curve"]), flush=True)


if __name__ == "__main__":
    main()
