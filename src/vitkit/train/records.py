"""Run records: metrics as JSONL (every logged step and epoch) and CSV (epochs), optional TensorBoard, curve PNG,
the progress bar and the printed epoch line."""

from __future__ import annotations

import csv
import json
import sys
import time
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

    def plot(self, task=None) -> Path | None:
        """``curves.png``: training loss per logged step, the held-out score (the task's) per epoch."""
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
        score, label = (task.score, task.score_label) if task is not None else ("top1", "top-1")
        for key, name in ((f"val_{score}", "model"), (f"ema_{score}", "EMA")):
            pts = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
            if pts:
                b.plot(*zip(*pts), marker="o", label=name)
        b.set_xlabel("epoch")
        b.set_ylabel(f"held-out {label}")
        if b.lines:
            b.legend()
        fig.tight_layout()
        out = self.run_dir / "curves.png"
        atomic_write(out, lambda p: fig.savefig(p, dpi=110, format="png"))
        plt.close(fig)
        return out

    @staticmethod
    def epoch_line(row: dict, task) -> str:
        """``epoch 3: train loss 0.41, held-out top-1 0.91 (EMA 0.92), 812 img/s, 4.1s``."""
        val, ema = row.get(f"val_{task.score}"), row.get(f"ema_{task.score}")
        held = f"held-out {task.score_label} {val:.4f}" if val is not None else "no held-out set"
        held += f" (EMA {ema:.4f})" if ema is not None else ""
        return (
            f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, {held}, {row['img_per_s']:.0f} img/s, "
            f"{row['seconds']:.1f}s"
        )


class EpochRecorder:
    """One epoch's running numbers: loss, images/s, the progress bar and the logged step rows."""

    def __init__(self, log: RunLog | None, epoch: int, steps: int, initial: int, cfg, is_main: bool = True):
        self.log, self.epoch, self.cfg = log, epoch, cfg
        self.t0, self.images, self.loss_sum, self.n = time.perf_counter(), 0, 0.0, 0
        self.bar = None
        if cfg.train.progress and is_main:
            from tqdm import tqdm

            self.bar = tqdm(
                total=steps,
                initial=initial,
                desc=f"epoch {epoch + 1}/{cfg.sched.epochs}",
                dynamic_ncols=True,
                disable=None,  # no bar when stderr is not a terminal (logs, CI)
                leave=False,
                file=sys.stderr,
            )

    def step(self, out, images: int, global_step: int) -> None:
        """Account for one completed optimizer step (``out``: a :class:`vitkit.train.step.StepResult`)."""
        self.images += images
        self.loss_sum += out.loss
        self.n += 1
        ips = self.images / max(time.perf_counter() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{out.lr:.2e}", img_s=f"{ips:.0f}")
        if self.log is not None and global_step % self.cfg.train.log_every == 0:
            row = dict(kind="step", step=global_step, epoch=self.epoch, img_per_s=ips, loss=out.loss, lr=out.lr)
            row.update(images=out.images, grad_norm=out.grad_norm)
            row.update({f"loss_{k}": v for k, v in (out.terms or {}).items()})
            self.log.log(row)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def finish(self, global_step: int) -> dict:
        """The epoch row's running part: ``step, epoch, train_loss, seconds, img_per_s``."""
        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - self.t0
        return dict(
            step=global_step,
            epoch=self.epoch + 1,
            train_loss=self.loss_sum / max(self.n, 1),
            seconds=seconds,
            img_per_s=self.images / max(seconds, 1e-9),
        )
