"""Segmentation on real MNIST digits: the MobileViT paper's DeepLabv3 and LaViT's Semantic-FPN, trained with
`vitkit train`.

    python benchmarks/segmentation/run.py                      # both recipes, ~30 min each on 2 cores
    python benchmarks/segmentation/run.py --recipes seg_deeplabv3_mobilevit --minutes 10

Writes `benchmarks/segmentation/results.json` and `README.md` (parameters against the paper's DeepLabv3 rows,
mIoU and pixel accuracy on the 500 held-out canvases, training time, the CPU) and `overlays.png` (predicted masks
on held-out canvases). The dataset is `vitkit data mnist-segmentation` from the real MNIST digits in
../shared/data/mnist. Each recipe trains for its configured epochs, or fewer so that it ends within `--minutes` of
wall time on this machine (measured from 12 timed steps first; the whole cosine schedule then runs).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from dense import draw_examples, run_recipes, write_readme  # noqa: E402

PAPER = {"deeplabv3_mobilevit_xxs": 1.9e6, "deeplabv3_mobilevit_xs": 2.9e6, "deeplabv3_mobilevit_s": 6.4e6}


def param_table() -> list[dict]:
    import torch

    import vitkit
    from vitkit.bench import count_params

    rows = []
    for name, paper in PAPER.items():
        with torch.device("meta"):
            n = count_params(vitkit.create_model(name, num_classes=21))
        rows.append({"model": name, "params": n, "paper": paper, "ratio": n / paper})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["seg_deeplabv3_mobilevit", "seg_semfpn_lavit"])
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time budget per recipe")
    ap.add_argument("--data", default=str(REPO / "runs" / "data" / "mnist-seg"))
    ap.add_argument("--mnist", default=str(REPO.parent / "shared" / "data" / "mnist"))
    args = ap.parse_args()
    if not (Path(args.data) / "ImageSets" / "Segmentation" / "val.txt").is_file():
        cmd = [sys.executable, "-m", "vitkit", "data", "mnist-segmentation", args.data, "--mnist", args.mnist]
        subprocess.run(cmd, check=True)
    rows = run_recipes("segmentation", args.recipes, args.data, args.minutes, ("miou", "pixel_acc", "per_class_iou"))
    best = max(rows, key=lambda r: r["miou"])
    draw_examples(REPO / "runs" / "bench-segmentation" / best["recipe"], Path(args.data) / "JPEGImages",
                  HERE / "overlays.png")  # fmt: skip
    write_readme(HERE, "segmentation", rows, param_table(), ("miou", "pixel_acc"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
