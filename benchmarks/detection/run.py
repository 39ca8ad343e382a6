"""Detection on real MNIST digits: the MobileViT paper's SSDLite and LaViT's RetinaNet, trained with `vitkit train`.

    python benchmarks/detection/run.py                     # both recipes, ~30 min each on 2 cores
    python benchmarks/detection/run.py --recipes det_ssdlite_mobilevit --minutes 10

Writes `benchmarks/detection/results.json` and `README.md` (parameters against the paper's SSDLite rows, COCO mAP and
AP50 on the 500 held-out canvases, training time, the CPU) and `predictions.png` (boxes on held-out canvases).
The dataset is `vitkit data mnist-detection` from the real MNIST digits in ../shared/data/mnist. Each recipe trains
for its configured epochs, or fewer so that it ends within `--minutes` of wall time on this machine (measured from
12 timed steps first; the whole cosine schedule then runs in the epochs that fit).
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

PAPER = {"ssdlite_mobilevit_xs": 2.7e6, "ssdlite_mobilevit_s": 5.7e6}  # MobileViT paper, SSDLite on COCO (81 classes)


def param_table() -> list[dict]:
    import torch

    import vitkit
    from vitkit.bench import count_params

    rows = []
    for name in ("ssdlite_mobilevit_xxs", "ssdlite_mobilevit_xs", "ssdlite_mobilevit_s"):
        with torch.device("meta"):
            n = count_params(vitkit.create_model(name, num_classes=80))
        paper = PAPER.get(name)
        rows.append({"model": name, "params": n, "paper": paper, "ratio": None if paper is None else n / paper})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["det_ssdlite_mobilevit", "det_retinanet_lavit"])
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time budget per recipe")
    ap.add_argument("--data", default=str(REPO / "runs" / "data" / "mnist-det"))
    ap.add_argument("--mnist", default=str(REPO.parent / "shared" / "data" / "mnist"))
    args = ap.parse_args()
    if not (Path(args.data) / "annotations" / "instances_val.json").is_file():
        cmd = [sys.executable, "-m", "vitkit", "data", "mnist-detection", args.data, "--mnist", args.mnist]
        subprocess.run(cmd, check=True)
    rows = run_recipes(
        "detection", args.recipes, args.data, args.minutes, ("map", "map50", "map75", "mar100", "per_class_ap")
    )
    best = max(rows, key=lambda r: r["map50"])
    draw_examples(REPO / "runs" / "bench-detection" / best["recipe"], Path(args.data) / "val", HERE / "predictions.png")
    write_readme(HERE, "detection", rows, param_table(), ("map", "map50", "map75", "mar100"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
