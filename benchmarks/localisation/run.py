"""Weakly supervised localisation on real digits (interpretability issue).

1. `vitkit train --config configs/mnist_nest_canvas.yaml`: a NesT trained with class labels only on the first
   8,000 digits of ../shared/data/mnist, each pasted unscaled at a random place on a 64x64 canvas.
2. Each of the 2,000 held-out digits is pasted at a random (seeded) place on a 64x64 canvas; its true box is
   the tight box of its non-zero pixels. For the true class, each method's peak is scored as a hit when it
   falls inside that box: CAM (exact, global-pool + linear head), Grad-CAM (final map) and GradCAT.
3. Writes results.json and examples.png beside this file.

    python benchmarks/localisation/run.py              # trains (about 7 min on 2 cores) unless the run exists
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(REPO / "runs" / "bench-localisation" / "nest"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run = Path(args.run)
    train_seconds = None
    if not (run / "checkpoints" / "last").is_dir():
        cmd = [
            sys.executable,
            "-m",
            "vitkit",
            "train",
            "--config",
            "configs/mnist_nest_canvas.yaml",
            "--output",
            str(run),
            "--set",
            f"data.root={args.data}",
            "--set",
            "train.progress=false",
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True)
        train_seconds = time.perf_counter() - t0

    from vitkit.data.mnist import MNIST
    from vitkit.data.transforms import place_on_canvas, to_tensor
    from vitkit.interpret import class_activation_map, grad_cam, gradcat
    from vitkit.train.inference import load_run

    torch.set_num_threads(min(2, os.cpu_count() or 2))
    model, info = load_run(run, "last")
    dc = info["data_config"]
    size = tuple(dc["input_size"][1:])
    held = MNIST(args.data, "test", indices=range(8000, 10000))
    rng = np.random.default_rng(args.seed)
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
    hits = {"cam": [], "grad_cam": [], "gradcat": []}
    correct, examples = 0, []
    for s in range(0, len(x), 100):
        xb, yb, bb = x[s : s + 100], y[s : s + 100], boxes[s : s + 100]
        with torch.no_grad():
            correct += (model(xb).argmax(1) == yb).sum().item()
        peaks = {
            "cam": class_activation_map(model, xb, yb).peaks,
            "grad_cam": grad_cam(model, xb, yb).peaks,
            "gradcat": (cat := gradcat(model, xb, yb)).peaks,
        }
        for k, p in peaks.items():
            hits[k] += [b[0] <= int(r) < b[2] and b[1] <= int(c) < b[3] for (r, c), b in zip(p.tolist(), bb)]
        if s == 0:
            examples = [(xb[i], bb[i], {k: v[i].tolist() for k, v in peaks.items()}, cat.boxes[i]) for i in range(8)]
    box_area = np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]) / (size[0] * size[1])
    result = {
        "command": "python benchmarks/localisation/run.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": info["model"],
        "model_kwargs": info["model_kwargs"],
        "train_command_seconds": train_seconds,  # None when the run already existed
        "train_loop_seconds": round(sum(r["seconds"] for r in _epochs(run)), 1),
        "canvas": list(size),
        "images": len(x),
        "canvas_top1": correct / len(x),
        "mean_box_fraction_of_canvas": round(float(box_area), 4),
        "hit_rate": {k: round(float(np.mean(v)), 4) for k, v in hits.items()},
    }
    (HERE / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    _figure(examples, HERE / "examples.png")


def _epochs(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["kind"] == "epoch"]


def _figure(examples, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(examples), figsize=(2.2 * len(examples), 2.6))
    marks = {"cam": ("r", "x"), "grad_cam": ("y", "+"), "gradcat": ("c", "o")}
    for ax, (x, box, peaks, tree) in zip(axes, examples):
        ax.imshow(x[0].numpy(), cmap="gray")
        y0, x0, y1, x1 = box
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", lw=1.5))
        b = tree[-1]
        ax.add_patch(
            plt.Rectangle((b[1] - 0.5, b[0] - 0.5), b[3] - b[1], b[2] - b[0], fill=False, edgecolor="c", lw=1, ls="--")
        )
        for k, (r, c) in peaks.items():
            ax.plot(c, r, marks[k][1], color=marks[k][0], ms=8, mfc="none", label=k)
        ax.axis("off")
    axes[0].legend(fontsize=6, loc="lower left")
    fig.suptitle("green: digit box; cyan dashed: GradCAT leaf block; markers: peaks (CAM x, Grad-CAM +, GradCAT o)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
