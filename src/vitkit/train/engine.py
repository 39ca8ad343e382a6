"""The training loop: ``Trainer(cfg).fit()``, also behind ``vitkit train``, the same for every task.

What differs between tasks (data, losses, metrics) comes from the run's :class:`vitkit.tasks.Task`; one
optimizer step is :class:`vitkit.train.step.TrainStep`. One step = ``optim.accum_steps`` micro-batches of
``data.batch_size`` per process. Everything random is keyed so that a run killed at any point and resumed with
``--resume auto`` ends with bitwise-identical weights (CPU, single process, ``num_workers=0``): the batch plan and
each sample's augmentation are functions of (seed, epoch, index); batch augmentation of (seed, epoch, step); the
learning rate of the step count; and the torch/NumPy/Python RNG states (drop-path, dropout) are saved in every
checkpoint. The DataLoader gets its own generator so it never draws from the global one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from vitkit.config import TrainConfig
from vitkit.data.loader import TransformView, batch_plan
from vitkit.machine import bf16_note
from vitkit.runtime import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed, resolve_device
from vitkit.tasks import EvalContext, build_task
from vitkit.train.evaluate import evaluate
from vitkit.train.optim import ModelEma, build_optimizers, lr_at
from vitkit.train.records import EpochRecorder, RunLog
from vitkit.train.rundir import resolve_run_dir, write_run_files
from vitkit.train.state import load_checkpoint_dir, rng_state, save_checkpoint, set_rng_state
from vitkit.train.step import TrainStep


class TrainingAborted(RuntimeError):
    """Too many non-finite losses or undecodable images in a row."""


class Trainer:
    """Builds the task, data, model, optimizer and run folder from a :class:`TrainConfig`; ``fit()`` trains."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        self.cfg, run = cfg, cfg.train
        if run.threads:
            torch.set_num_threads(run.threads)
        torch.manual_seed(run.seed)  # model initialisation and everything after it
        self.device = resolve_device(run.device)
        self.dist: DistInfo = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if run.amp == "bf16" and self.dist.is_main and (note := bf16_note(self.device)):
            print(f"train.amp=bf16: {note}", file=sys.stderr)
        self.task = build_task(cfg)
        self._build_data()
        self.model = self.task.build_model().to(self.device)
        if run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.data_config = self.task.data_config(self.model)
        self.size = tuple(self.data_config["input_size"][1:])
        self.ema = ModelEma(self.model, run.ema_decay) if run.ema_decay > 0 else None
        self.step = TrainStep(self.model, self.task, build_optimizers(self.model, self.task, cfg.optim), run,
                              cfg.optim, self.device, self.dist, ema=self.ema)  # fmt: skip
        self.steps_per_epoch = len(self._plan(0)) // cfg.optim.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError("an epoch holds fewer micro-batches than optim.accum_steps")
        self.total_steps = cfg.sched.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.sched.warmup_epochs * self.steps_per_epoch)
        self.epoch = self.step_in_epoch = self.global_step = 0  # progress: all saved in the state file
        self.best = {"score": -float("inf"), "epoch": None}
        self.counters = {"nonfinite_steps": 0, "bad_images": 0, "images_seen": 0}
        self._consecutive_nonfinite = self._consecutive_bad = 0
        self._rng_snapshot, self._epoch_failures, self.last_eval = None, [], {}
        self.run_dir, ckpt = self._broadcast(resolve_run_dir, cfg, resume)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.log = RunLog(self.run_dir, run.tensorboard) if self.dist.is_main else None
        if ckpt is not None:
            self._restore(ckpt)
        elif self.dist.is_main:
            facts = {"train_images": len(self.train_set), "val_images": len(self.val_set or ())}
            write_run_files(self.run_dir, cfg, dict(facts, world_size=self.dist.world_size))
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step.forward_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if run.compile:
            self.step.forward_model = torch.compile(self.step.forward_model)

    def _build_data(self) -> None:
        d = self.cfg.data
        if self.dist.is_main or not d.download:
            self.train_set = self.task.dataset(d.train_split, download=d.download and self.dist.is_main)
        barrier(self.dist)
        if not self.dist.is_main and d.download:
            self.train_set = self.task.dataset(d.train_split)
        self.val_set = self.task.dataset(d.val_split) if d.val_split else None
        self.task.resolve(self.train_set)

    def _broadcast(self, fn, *args):
        """``fn(*args)`` computed on rank 0 and shared with every rank."""
        if not self.dist.enabled:
            return fn(*args)
        obj = [fn(*args) if self.dist.is_main else None]
        torch.distributed.broadcast_object_list(obj, src=0)
        return obj[0]

    # ---- checkpoints --------------------------------------------------------------------------------

    def _state(self) -> dict:
        scaler = self.step.scaler
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best": dict(self.best),
            "counters": dict(self.counters),
            "optimizer": self.step.optimizer_state(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": self._rng_snapshot or rng_state(),
            "config": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
        }

    def save(self, name: str = "last") -> Path | None:
        path = None
        if self.dist.is_main:
            ema = self.ema.module if self.ema else None
            path = save_checkpoint(self.ckpt_root, name, self.model, ema, self._state())
        barrier(self.dist)
        return path

    def _restore(self, ckpt: Path) -> None:
        weights, ema, state = load_checkpoint_dir(ckpt)
        self.model.load_state_dict(weights)
        if self.ema is not None:
            if ema is None:
                raise ValueError(f"{ckpt}: the run uses EMA weights but the checkpoint has none")
            self.ema.module.load_state_dict(ema)
        self.step.load_optimizer_state(state["optimizer"])
        if self.step.scaler is not None and state.get("scaler"):
            self.step.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.best, self.counters = state["best"], state["counters"]
        self.best.setdefault("score", self.best.pop("top1", -float("inf")))  # written before tasks: 'top1'
        if state.get("world_size", 1) != self.dist.world_size:
            raise ValueError(f"{ckpt} was written by {state['world_size']} processes; resume with the same number")
        set_rng_state(state["rng"])
        if self.log is not None:
            self.log.truncate_after(self.global_step)
        if self.dist.is_main:
            print(f"resumed {ckpt} at epoch {self.epoch} step {self.step_in_epoch} (global step {self.global_step})")

    # ---- the loop -----------------------------------------------------------------------------------

    def _plan(self, epoch: int) -> list:
        d = self.cfg.data
        ms = {"resolutions": d.resolutions, "base_res": self.size[0]} if d.multiscale else None
        args = (len(self.train_set), d.batch_size, self.size, epoch, self.cfg.train.seed)
        return batch_plan(*args, self.dist.world_size, self.dist.rank, ms)

    def _next_micro_batches(self, it) -> list:
        """The next step's micro-batches as ``(inputs, targets)``, counting undecodable images (abort on a run)."""
        out = []
        for _ in range(self.cfg.optim.accum_steps):
            x, y, failed = next(it)
            self.counters["bad_images"] += len(failed)
            self._epoch_failures.extend(failed)
            # counted per batch: a batch with any good image restarts the run of failures
            self._consecutive_bad = len(failed) if x is not None else self._consecutive_bad + len(failed)
            if self._consecutive_bad >= self.cfg.data.max_bad_images:
                names = ", ".join(f.path for f in self._epoch_failures[-5:])
                raise TrainingAborted(f"{self._consecutive_bad} images in a row could not be decoded (last: {names})")
            out.append((x, y))
        return out

    def _count(self, result) -> None:
        if result.skipped != "nonfinite":
            self._consecutive_nonfinite = 0 if result.skipped is None else self._consecutive_nonfinite
            return
        self.counters["nonfinite_steps"] += 1
        self._consecutive_nonfinite += 1
        if self._consecutive_nonfinite >= self.cfg.train.max_nonfinite:
            raise TrainingAborted(f"{self._consecutive_nonfinite} optimizer steps in a row had a NaN/Inf loss")

    def fit(self) -> dict:
        """Train to the end of the schedule (or ``train.max_steps``); return the final summary."""
        cfg, accum = self.cfg, self.cfg.optim.accum_steps
        view = TransformView(self.train_set, self.task.train_transform(self.data_config), cfg.train.seed, joint=True)
        t_start, images_done, stop = time.perf_counter(), 0, False
        try:
            while self.epoch < cfg.sched.epochs and not stop:
                epoch = self.epoch
                plan = self._plan(epoch)[: self.steps_per_epoch * accum][self.step_in_epoch * accum :]
                it = iter(DataLoader(view, batch_sampler=plan, collate_fn=self.task.collate,  # private generator:
                                     num_workers=cfg.data.num_workers, generator=torch.Generator()))  # fmt: skip
                self._epoch_failures = []
                rec = EpochRecorder(self.log, epoch, self.steps_per_epoch, self.step_in_epoch, cfg, self.dist.is_main)
                self.model.train()
                while self.step_in_epoch < self.steps_per_epoch:
                    lr = lr_at(self.global_step, self.total_steps, self.warmup_steps, cfg.optim.lr, cfg.sched)
                    out = self.step(self._next_micro_batches(it), lr, (cfg.train.seed, epoch, self.step_in_epoch))
                    self._count(out)
                    self.step_in_epoch += 1
                    self.global_step += 1
                    if out.skipped is None:
                        images = int(all_reduce_sum(torch.tensor(out.images), self.dist))
                        self.counters["images_seen"] += images
                        rec.step(out, images, self.global_step)
                    rec.tick()
                    if self.dist.is_main:  # the task's periodic work (e.g. sample grids); must not touch the RNG
                        ema = self.ema.module if self.ema else None
                        self.task.after_step(self.model, ema, self.global_step, self.run_dir)
                    every = cfg.train.checkpoint_every
                    if every and self.global_step % every == 0 and self.step_in_epoch < self.steps_per_epoch:
                        self.save("last")
                    if cfg.train.max_steps and self.global_step >= cfg.train.max_steps:
                        stop = True
                        break
                images_done += rec.images
                complete = self.step_in_epoch >= self.steps_per_epoch
                if complete:
                    self.epoch, self.step_in_epoch = epoch + 1, 0
                self._end_epoch(rec.finish(self.global_step), complete)
            return self.summary(time.perf_counter() - t_start, images_done)
        finally:
            cleanup(self.dist)

    def _eval_models(self) -> dict:
        if self.val_set is None:
            return {}
        ctx = EvalContext(self.device, self.cfg.train.amp, self.dist)
        args = (self.val_set, self.data_config, self.cfg.data.eval_batch_size, ctx, self.cfg.train.channels_last)
        out = {"model": evaluate(self.task, self.model, *args)}
        if self.ema is not None:
            out["ema"] = evaluate(self.task, self.ema.module, *args)
        return out

    def _end_epoch(self, row: dict, complete: bool) -> None:
        """Evaluate, save ``last`` (and ``best``), log; a run stopped mid-epoch logs a 'partial' row."""
        self._rng_snapshot = rng_state()  # the RNG as training left it, whatever evaluation does
        self.last_eval = results = self._eval_models()
        row = {"kind": "epoch" if complete else "partial", **row, "bad_images": len(self._epoch_failures),
               "nonfinite_steps": self.counters["nonfinite_steps"]}  # fmt: skip
        for which, prefix in (("model", "val"), ("ema", "ema")):
            row.update({f"{prefix}_{m}": results[which][m] for m in self.task.metrics if which in results})
        # best = the better of the raw and EMA weights (an EMA lags far behind early on, e.g. with BatchNorm)
        scores = {w: r[self.task.score] for w, r in results.items()}
        which = max(scores, key=scores.get) if scores else None
        improved = which is not None and scores[which] > self.best["score"]
        if improved:
            self.best = {"score": scores[which], "epoch": row["epoch"], "weights": which}
        if self._epoch_failures and self.dist.is_main:
            shown = "; ".join(f"{f.path} ({f.reason})" for f in self._epoch_failures[:5])
            more = len(self._epoch_failures) - 5
            print(f"epoch {row['epoch']}: skipped {len(self._epoch_failures)} undecodable image(s): {shown}"
                  + (f" and {more} more" if more > 0 else ""), file=sys.stderr)  # fmt: skip
        self.save("last")
        if improved:
            self.save("best")
        self._rng_snapshot = None
        if self.dist.is_main:
            self.log.log(row)
            self.log.plot(self.task)
            print(self.log.epoch_line(row, self.task), flush=True)

    def summary(self, seconds: float, images: int) -> dict:
        score, last = self.task.score, self.last_eval
        s = {
            "run_dir": str(self.run_dir),
            "model": self.cfg.model.name,
            "task": self.task.name,
            "score": score,
            "score_label": self.task.score_label,
            "epochs": self.epoch,
            "global_step": self.global_step,
            f"best_{score}": self.best["score"] if self.best["epoch"] else None,
            "best_epoch": self.best["epoch"],
            "best_weights": self.best.get("weights"),
            f"final_{score}": last.get("model", {}).get(score),
            f"final_ema_{score}": last.get("ema", {}).get(score),
            "seconds": seconds,
            "img_per_s": images / max(seconds, 1e-9),
            **self.counters,
        }
        if self.dist.is_main and "model" in last:
            title = f"{self.cfg.model.name}: held-out {self.task.score_label} {last['model'][score]:.4f}"
            self.task.write_eval(dict(last["model"], summary=s, ema=last.get("ema")), self.run_dir, title)
        return s


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Train from a config (see :mod:`vitkit.config`); the Python face of ``vitkit train``."""
    return Trainer(cfg, resume).fit()
