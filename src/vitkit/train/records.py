"""Run records: metrics as JSONL (every logged step and epoch) and CSV (epochs), optional TensorBoard, curve PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from vitkit._io import atomic_write


class RunLog:
    """Appends metrics rows to ``metrics.jsonl`` (all) and ``metrics.csv`` (epoch rows)."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.run_dir = Path(run_dir)
        self.jsonl, self.csv = self.run_dir / "metrics.jsonl", self.run_dir / "metrics.csv"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                print("train.tensorboard: the tensorboard package is not installed; skipping TensorBoard logs")

    def rows(self) -> list[dict]:
        if not self.jsonl.is_file():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def truncate_after(self, global_step: int) -> None:
        """Drop rows logged after ``global_step`` (they belong to steps a resumed run will redo)."""
        keep = [r for r in self.rows() if r["step"] <= global_step]
        atomic_write(self.jsonl, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in keep)))
        self._rewrite_csv([r for r in keep if r["kind"] == "epoch"])

    def log(self, row: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        if row["kind"] == "epoch":
            self._rewrite_csv([r for r in self.rows() if r["kind"] == "epoch"])
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{row['kind']}/{k}", v, row["step"])
            self.tb.flush()

    def _rewrite_csv(self, rows: list[dict]) -> None:
        if not rows:
            return
        fields = list(dict.fromkeys(k for r in rows for k in r))

        def write(p):
            with open(p, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)

        atomic_write(self.csv, write)

    def plot(self) -> Path | None:
        """``curves.png``: training loss per logged step, held-out top-1 per epoch."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = self.rows()
        steps = [r for r in rows if r["kind"] == "step"]
        epochs = [r for r in rows if r["kind"] == "epoch"]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
        a.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
        a.set_xlabel("optimizer step")
        a.set_ylabel("training loss")
        for key, label in (("val_top1", "model"), ("ema_top1", "EMA")):
            pts = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
            if pts:
                b.plot(*zip(*pts), marker="o", label=label)
        b.set_xlabel("epoch")
        b.set_ylabel("held-out top-1")
        if b.lines:
            b.legend()
        fig.tight_layout()
        out = self.run_dir / "curves.png"
        atomic_write(out, lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)
        return out
