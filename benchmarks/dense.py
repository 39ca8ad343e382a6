"""Shared pieces of the dense-prediction benchmarks (detection/, segmentation/): a wall-time budget turned into a
schedule, a figure of predictions on held-out canvases, and the README with the machine it ran on."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def calibrated_epochs(cfg: Path, sets: list[str], minutes: float, train_images: int) -> int:
    """Epochs of the recipe that fit ``minutes`` of wall time on this machine, from 12 timed training steps and
    one timed evaluation (the cosine schedule then runs whole; the recipe's own epoch count is the ceiling)."""
    recipe = yaml.safe_load(cfg.read_text())
    batch = recipe["data"]["batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        cal = [s if not s.startswith("train.output=") else f"train.output={tmp}/cal" for s in sets]
        cmd = [sys.executable, "-m", "vitkit", "train", "--config", str(cfg), *cal, "--set", "train.max_steps=12",
               "--set", "train.log_every=1"]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
        rows = [json.loads(x) for x in (Path(tmp) / "cal" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    step_s = batch / (sum(r["img_per_s"] for r in steps[4:]) / len(steps[4:]))  # after warm-up
    epoch_s = math.ceil(train_images / batch) * step_s * 1.1  # + evaluation and checkpoints
    return max(1, min(recipe["sched"]["epochs"], int(minutes * 60 / epoch_s)))


def run_recipes(kind: str, recipes: list[str], data: str, minutes: float, keep: tuple[str, ...]) -> list[dict]:
    """Train each ``configs/<recipe>.yaml`` on ``data`` within ``minutes`` (see :func:`calibrated_epochs`),
    evaluate its last checkpoint with ``vitkit eval`` and return one row per recipe with the ``keep`` results.
    An interrupted run (its folder exists) is resumed, not restarted; a finished one (``bench.json``) is only
    evaluated again."""
    import time

    vitkit, rows = [sys.executable, "-m", "vitkit"], []
    for recipe in recipes:
        cfg = REPO / "configs" / f"{recipe}.yaml"
        out = REPO / "runs" / f"bench-{kind}" / recipe
        sets = ["--set", f"data.root={data}", "--set", f"train.output={out}", "--set", "train.progress=false"]
        done = out / "bench.json"  # a finished run keeps its schedule and time: not calibrated or trained again
        if done.is_file():
            epochs, wall = (json.loads(done.read_text())[k] for k in ("epochs", "wall_seconds"))
            cmd = [*vitkit, "train", "--config", str(cfg), *sets, "--set", f"sched.epochs={epochs}"]
        else:
            epochs = calibrated_epochs(cfg, sets, minutes, train_images=2000)
            cmd = [*vitkit, "train", "--config", str(cfg), *sets, "--set", f"sched.epochs={epochs}"]
            t0 = time.perf_counter()
            subprocess.run(cmd + (["--resume", "auto"] if out.exists() else []), check=True, cwd=REPO)
            wall = time.perf_counter() - t0
            done.write_text(json.dumps({"epochs": epochs, "wall_seconds": round(wall, 1)}))
        subprocess.run([*vitkit, "eval", str(out), "--which", "last"], check=True, cwd=REPO)
        res = json.loads((out / "eval" / "eval.json").read_text())
        command = " ".join(["vitkit", *cmd[3:]]).replace(f"{REPO}/", "")  # as typed from the repository root
        rows.append({"recipe": recipe, "command": command, "epochs": epochs,
                     "wall_seconds": round(wall, 1), "images": res["images"], **{k: res[k] for k in keep}})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def draw_examples(run: Path, images: Path, out: Path, n: int = 8) -> Path:
    """The run's predictions on the first ``n`` held-out images (drawn by its task), tiled into one PNG."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        pics = sorted(p for p in images.iterdir() if p.name.startswith("val_"))[:n]
        subprocess.run([sys.executable, "-m", "vitkit", "predict", str(run), *map(str, pics), "--out", tmp],
                       check=True, cwd=REPO, capture_output=True)  # fmt: skip
        drawn = sorted(p for p in Path(tmp).glob("*.png") if p.stem.endswith(("_boxes", "_overlay")))
        tiles = [Image.open(p).convert("RGB") for p in drawn]
        w, h = tiles[0].size
        sheet = Image.new("RGB", (w * 4, h * math.ceil(len(tiles) / 4)), "white")
        for i, t in enumerate(tiles):
            sheet.paste(t, ((i % 4) * w, (i // 4) * h))
        sheet = sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST)
        sheet.save(out)
    return out


def cpu_line() -> str:
    from vitkit.machine import cpu_line as line

    return line()


def write_readme(folder: Path, task: str, rows: list[dict], params: list[dict], metrics: tuple[str, ...]) -> None:
    """results.json and README.md: parameters against the paper, held-out metrics and time, with the CPU, then the
    folder's hand-written ``notes.md`` (what the numbers show and what they do not), if it has one."""
    machine = cpu_line()
    (folder / "results.json").write_text(json.dumps({"machine": machine, "params": params, "runs": rows}, indent=2))
    lines = [f"# {task.capitalize()} on real MNIST digits", "", f"Machine: {machine}.", ""]
    lines += ["## Parameters against the paper", "", "| model | params | paper | ratio |", "|---|---|---|---|"]
    for p in params:
        paper = "-" if p["paper"] is None else f"{p['paper'] / 1e6:.1f}M"
        ratio = "-" if p["ratio"] is None else f"{p['ratio']:.4f}"
        lines.append(f"| {p['model']} | {p['params'] / 1e6:.3f}M | {paper} | {ratio} |")
    lines += ["", "## Held-out results", "", "| recipe | " + " | ".join(metrics) + " | epochs | train wall time |",
              "|---|" + "---|" * (len(metrics) + 2)]  # fmt: skip
    for r in rows:
        vals = " | ".join(f"{r[m]:.4f}" for m in metrics)
        lines.append(f"| {r['recipe']} | {vals} | {r['epochs']} | {r['wall_seconds'] / 60:.1f} min |")
    lines += ["", "Commands (from the repository root):", ""]
    lines += [f"    {r['command']}" for r in rows]
    notes = folder / "notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
