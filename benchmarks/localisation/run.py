"""Weakly supervised localisation on real digits (interpretability issue).

1. Per family, `vitkit train --config configs/mnist_<family>_canvas.yaml`: a model trained with class labels
   only on the first 8,000 digits of ../shared/data/mnist, each pasted unscaled at a random place on a canvas
   (64x64; 96x96 for MobileViT and HaloNet, whose final maps have stride 32).
2. Each of the 2,000 held-out digits is pasted at a random (seeded) place on a canvas; its true box is the
   tight box of its non-zero pixels. For the true class, each method's peak is scored as a hit when it falls
   inside that box: CAM (exact, global-pool + linear head), Grad-CAM (final map / patch tokens), GradCAT (NesT).
3. Writes results.json (one entry per family) and examples figures (examples.png for NesT,
   examples_<family>.png for the others) beside this file.

    python benchmarks/localisation/run.py                      # every family; trains the runs that do not exist
    python benchmarks/localisation/run.py --families vit       # one family
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

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


FAMILIES = {  # recipe, the methods that apply
    "nest": ("configs/mnist_nest_canvas.yaml", ("cam", "grad_cam", "gradcat")),
    "vit": ("configs/mnist_vit_canvas.yaml", ("grad_cam",)),  # mean-pooled with fc_norm: no exact CAM
    "mobilevit": ("configs/mnist_mobilevit_canvas.yaml", ("cam", "grad_cam")),
    "halonet": ("configs/mnist_halonet_canvas.yaml", ("cam", "grad_cam")),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench-localisation"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 2))
    out = HERE / "results.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results = results if "families" in results else {"families": {}}
    for fam in args.families:
        res, examples = score(fam, Path(args.runs) / fam, args.data, args.seed)
        results["families"][fam] = res
        print(json.dumps({fam: res}, indent=2), flush=True)
        _figure(examples, HERE / ("examples.png" if fam == "nest" else f"examples_{fam}.png"), fam)
    results["command"] = "python benchmarks/localisation/run.py " + " ".join(argv or sys.argv[1:])
    results["machine"] = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps(results, indent=2))


def score(fam: str, run: Path, data: str, seed: int):
    recipe, methods = FAMILIES[fam]
    train_seconds = None
    if not (run / "checkpoints" / "last").is_dir():
        cmd = [sys.executable, "-m", "vitkit", "train", "--config", recipe, "--output", str(run)]
        cmd += ["--set", f"data.root={data}", "--set", "train.progress=false"]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True)
        train_seconds = time.perf_counter() - t0

    from vitkit.data.mnist import MNIST
    from vitkit.data.transforms import place_on_canvas, to_tensor
    from vitkit.interpret import class_activation_map, grad_cam, gradcat
    from vitkit.train import load_run

    loaded = load_run(run, "last")
    model, dc = loaded.model, loaded.data_config
    size = tuple(dc["input_size"][1:])
    held = MNIST(data, "test", indices=range(8000, 10000))
    rng = np.random.default_rng(seed)
    xs, boxes, labels = [], [], []
    for i in range(len(held)):
        img, label = held[i]
        canvas, (y0, x0, _, _) = place_on_canvas(img, size, rng)
        arr = np.asarray(img)
        rows, cols = np.nonzero(arr.any(1))[0], np.nonzero(arr.any(0))[0]
        boxes.append((y0 + rows.min(), x0 + cols.min(), y0 + rows.max() + 1, x0 + cols.max() + 1))
        xs.append(to_tensor(canvas, dc["mean"], dc["std"]))
        labels.append(label)
    x, y = torch.stack(xs), torch.tensor(labels)
    fns = {"cam": class_activation_map, "grad_cam": grad_cam, "gradcat": gradcat}
    hits = {m: [] for m in methods}
    correct, examples = 0, []
    for s in range(0, len(x), 100):
        xb, yb, bb = x[s : s + 100], y[s : s + 100], boxes[s : s + 100]
        with torch.no_grad():
            correct += (model(xb).argmax(1) == yb).sum().item()
        res = {m: fns[m](model, xb, yb) for m in methods}
        for m, r in res.items():
            hits[m] += [b[0] <= int(r_) < b[2] and b[1] <= int(c) < b[3] for (r_, c), b in zip(r.peaks.tolist(), bb)]
        if s == 0:
            peaks = {m: r.peaks for m, r in res.items()}
            trees = res["gradcat"].boxes if "gradcat" in res else [None] * len(xb)
            examples = [(xb[i], bb[i], {k: v[i].tolist() for k, v in peaks.items()}, trees[i]) for i in range(8)]
    box_area = np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]) / (size[0] * size[1])
    result = {
        "recipe": recipe,
        "model": loaded.cfg.model.name,
        "model_kwargs": loaded.cfg.model.kwargs,
        "train_command_seconds": train_seconds,  # None when the run already existed
        "train_loop_seconds": round(sum(r["seconds"] for r in _epochs(run)), 1),
        "canvas": list(size),
        "images": len(x),
        "canvas_top1": correct / len(x),
        "mean_box_fraction_of_canvas": round(float(box_area), 4),
        "hit_rate": {k: round(float(np.mean(v)), 4) for k, v in hits.items()},
    }
    return result, examples


def _epochs(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["kind"] == "epoch"]


def _figure(examples, path: Path, family: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(examples), figsize=(2.2 * len(examples), 2.6))
    marks = {"cam": ("r", "x"), "grad_cam": ("y", "+"), "gradcat": ("c", "o")}
    for ax, (x, box, peaks, tree) in zip(axes, examples):
        ax.imshow(x[0].numpy(), cmap="gray")
        y0, x0, y1, x1 = box
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", lw=1.5))
        if tree is not None:
            b = tree[-1]
            ax.add_patch(
                plt.Rectangle(
                    (b[1] - 0.5, b[0] - 0.5), b[3] - b[1], b[2] - b[0], fill=False, edgecolor="c", lw=1, ls="--"
                )
            )
        for k, (r, c) in peaks.items():
            ax.plot(c, r, marks[k][1], color=marks[k][0], ms=8, mfc="none", label=k)
        ax.axis("off")
    axes[0].legend(fontsize=6, loc="lower left")
    names = ", ".join(f"{k} {marks[k][1]}" for k in examples[0][2])
    extra = "; cyan dashed: GradCAT leaf block" if examples[0][3] is not None else ""
    fig.suptitle(f"{family}: green: digit box{extra}; peaks: {names}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
