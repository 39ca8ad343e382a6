"""The training loop: ``Trainer(cfg).fit()``, also behind ``vitkit train``.

One optimizer step = ``optim.accum_steps`` micro-batches of ``data.batch_size`` per process. Everything
random is keyed so that a run killed at any point and resumed with ``--resume auto`` ends with
bitwise-identical weights (CPU, single process, ``num_workers=0``): the batch plan and each sample's
augmentation are functions of (seed, epoch, index); mixup/cutmix draws of (seed, epoch, step); the
learning rate of the step count; and the torch/NumPy/Python RNG states (drop-path, dropout) are saved
in every checkpoint. The DataLoader gets its own generator so it never draws from the global one.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import vitkit
from vitkit.data.datasets import build_dataset
from vitkit.data.loader import TransformView, batch_plan, collate_skip, eval_plan
from vitkit.data.transforms import EvalTransform, TrainTransform, mix_batch, soft_cross_entropy
from vitkit.train.config import TrainConfig
from vitkit.train.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from vitkit.train.evaluate import autocast, evaluate, plot_confusion
from vitkit.train.optim import ModelEma, build_optimizer, lr_at
from vitkit.train.records import RunLog
from vitkit.train.state import find_checkpoint, load_checkpoint_dir, rng_state, save_checkpoint, set_rng_state


class TrainingAborted(RuntimeError):
    """Too many non-finite losses or undecodable images in a row."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available")
    return dev


def resolve_run_dir(cfg: TrainConfig, resume: str | None) -> tuple[Path, Path | None]:
    """``(run folder, checkpoint folder to resume from or None)``. Never reuses a folder that holds a run
    unless asked to resume it; the default folder gets a ``-N`` suffix instead."""
    explicit = cfg.train.output is not None
    base = Path(cfg.train.output) if explicit else Path("runs") / f"{cfg.model.name}-{cfg.data.dataset}"
    if resume not in (None, "auto"):
        path = Path(resume)
        ckpt = path if (path / "state.pt").is_file() else find_checkpoint(path / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"--resume {resume!r}: no checkpoint found there")
        run_dir = ckpt.parent.parent
        return run_dir, ckpt
    candidates = [base] if explicit else [base, *sorted(base.parent.glob(base.name + "-*"))]
    if resume == "auto":
        found = [(c, find_checkpoint(c / "checkpoints")) for c in candidates if c.is_dir()]
        found = [(c, k) for c, k in found if k is not None]
        if found:
            return max(found, key=lambda ck: (ck[1] / "state.pt").stat().st_mtime)
        if explicit:
            return base, None
    if not base.exists() or not any(base.iterdir()):
        return base, None
    if explicit:
        raise FileExistsError(
            f"run folder {str(base)!r} already holds a run; pass --resume auto to continue it, or another --output"
        )
    n = 2
    while (base.parent / f"{base.name}-{n}").exists():
        n += 1
    return base.parent / f"{base.name}-{n}", None


class Trainer:
    """Builds data, model, optimizer and run folder from a :class:`TrainConfig`; ``fit()`` trains."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        self.cfg = cfg
        run = cfg.train
        if run.threads:
            torch.set_num_threads(run.threads)
        torch.manual_seed(run.seed)  # model initialisation and everything after it
        self.device = resolve_device(run.device)
        self.dist: DistInfo = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self._build_data()
        self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.ema = ModelEma(self.model, run.ema_decay) if run.ema_decay > 0 else None
        self.scaler = torch.amp.GradScaler("cuda") if run.amp == "fp16" else None
        self.steps_per_epoch = len(self._plan(0)) // cfg.optim.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError("an epoch holds fewer micro-batches than optim.accum_steps")
        self.total_steps = cfg.sched.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.sched.warmup_epochs * self.steps_per_epoch)
        # progress (all saved in the state file)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best = {"top1": -1.0, "epoch": None}
        self.counters = {"nonfinite_steps": 0, "bad_images": 0, "images_seen": 0}
        self._consecutive_nonfinite = self._consecutive_bad = 0
        self._rng_snapshot = None
        self.run_dir, ckpt = self._choose_run_dir(resume)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.log = RunLog(self.run_dir, run.tensorboard and self.dist.is_main) if self.dist.is_main else None
        if ckpt is not None:
            self._restore(ckpt)
        elif self.dist.is_main:
            self._write_run_files()
        self.train_model = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if run.compile:
            self.train_model = torch.compile(self.train_model)

    # ---- set-up -------------------------------------------------------------------------------------

    def _build_data(self) -> None:
        d = self.cfg.data
        if self.dist.is_main or not d.download:
            self.train_set = build_dataset(d.dataset, d.root, d.train_split, download=d.download and self.dist.is_main)
        barrier(self.dist)
        if not self.dist.is_main and d.download:
            self.train_set = build_dataset(d.dataset, d.root, d.train_split)
        self.val_set = build_dataset(d.dataset, d.root, d.val_split) if d.val_split else None
        self.classes = list(self.train_set.classes)
        self.num_classes = len(self.classes)

    def _build_model(self) -> None:
        m, d = self.cfg.model, self.cfg.data
        kwargs = dict(m.kwargs)
        if "in_chans" not in kwargs:
            img = self._first_image()
            kwargs["in_chans"] = 1 if img is not None and img.mode in ("L", "1", "I;16", "I") else 3
        self.model = vitkit.create_model(
            m.name,
            pretrained=m.pretrained,
            checkpoint_path=m.checkpoint,
            num_classes=self.num_classes,
            img_size=m.img_size,
            drop_path_rate=m.drop_path_rate,
            **kwargs,
        ).to(self.device)
        if self.cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        dc = vitkit.resolve_data_config(self.model)
        self.in_chans, self.size = dc["input_size"][0], tuple(dc["input_size"][1:])
        mean, std = d.mean or dc["mean"], d.std or dc["std"]
        a = self.cfg.aug
        self.train_tf = TrainTransform(
            self.size,
            mean,
            std,
            self.in_chans,
            a.crop,
            tuple(a.scale),
            a.pad,
            a.hflip,
            a.randaugment,
            a.erasing,
            dc["interpolation"],
        )
        self.data_config = dict(dc, mean=list(mean), std=list(std), eval_canvas=a.crop == "canvas")
        self.eval_tf = EvalTransform.from_data_config(self.data_config)

    def _first_image(self):
        for i in range(min(len(self.train_set), 8)):
            try:
                return self.train_set[i][0]
            except Exception:  # noqa: BLE001 - a bad file is reported by the loader later
                continue
        return None

    def _choose_run_dir(self, resume):
        if not self.dist.enabled:
            return resolve_run_dir(self.cfg, resume)
        obj = [resolve_run_dir(self.cfg, resume) if self.dist.is_main else None]
        torch.distributed.broadcast_object_list(obj, src=0)
        return obj[0]

    def _write_run_files(self) -> None:
        import yaml

        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        info = {
            "model": self.cfg.model.name,
            "model_kwargs": self.cfg.model.kwargs,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "data_config": self.data_config,
            "train_images": len(self.train_set),
            "val_images": len(self.val_set) if self.val_set is not None else 0,
            "world_size": self.dist.world_size,
            "command": " ".join(sys.argv),
            "machine": {
                "platform": platform.platform(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
        }
        (self.run_dir / "run.json").write_text(json.dumps(info, indent=2))

    # ---- checkpoints --------------------------------------------------------------------------------

    def _state(self) -> dict:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best": dict(self.best),
            "counters": dict(self.counters),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": self._rng_snapshot or rng_state(),
            "config": self.cfg.to_dict(),
            "classes": self.classes,
            "world_size": self.dist.world_size,
        }

    def save(self, name: str = "last") -> Path | None:
        path = None
        if self.dist.is_main:
            path = save_checkpoint(
                self.ckpt_root, name, self.model, self.ema.module if self.ema else None, self._state()
            )
        barrier(self.dist)
        return path

    def _restore(self, ckpt: Path) -> None:
        weights, ema, state = load_checkpoint_dir(ckpt)
        self.model.load_state_dict(weights)
        if self.ema is not None:
            if ema is None:
                raise ValueError(f"{ckpt}: the run uses EMA weights but the checkpoint has none")
            self.ema.module.load_state_dict(ema)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.best, self.counters = state["best"], state["counters"]
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
        n = len(self.train_set)
        return batch_plan(
            n, d.batch_size, self.size, epoch, self.cfg.train.seed, self.dist.world_size, self.dist.rank, ms
        )

    def _loader(self, plan: list, view) -> DataLoader:
        # a private generator: creating an iterator must not consume the global RNG (exact resume)
        return DataLoader(
            view,
            batch_sampler=plan,
            collate_fn=collate_skip,
            num_workers=self.cfg.data.num_workers,
            generator=torch.Generator(),
        )

    def _note_failures(self, failed: list, good: int) -> None:
        self.counters["bad_images"] += len(failed)
        self._epoch_failures.extend(failed)
        # counted per batch: a batch with any good image restarts the run of failures
        self._consecutive_bad = len(failed) if good else self._consecutive_bad + len(failed)
        if self._consecutive_bad >= self.cfg.data.max_bad_images:
            names = ", ".join(f.path for f in self._epoch_failures[-5:])
            raise TrainingAborted(f"{self._consecutive_bad} images in a row could not be decoded (last: {names})")

    def _forward_loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with autocast(self.device, self.cfg.train.amp):
            logits = self.train_model(x)
        loss = soft_cross_entropy(logits, target)
        parts = {}
        weights = self.cfg.train.extra_loss_weights
        if weights:
            extra = self.model.extra_losses() if hasattr(self.model, "extra_losses") else {}
            unknown = set(weights) - set(extra)
            if unknown:
                raise ValueError(f"train.extra_loss_weights names {sorted(unknown)}; the model gives {sorted(extra)}")
            for k, w in weights.items():
                parts[k] = extra[k].float()
                loss = loss + float(w) * parts[k]
        return loss, parts

    def _train_step(self, micro_batches, epoch: int, step: int) -> dict | None:
        """One optimizer step over ``accum`` micro-batches; returns its stats, or None if it was skipped."""
        cfg, accum = self.cfg, self.cfg.optim.accum_steps
        lr = lr_at(self.global_step, self.total_steps, self.warmup_steps, cfg.optim.lr, cfg.sched)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, images, finite = 0.0, 0, True
        for k, (x, y, failed) in enumerate(micro_batches):
            self._note_failures(failed, 0 if x is None else len(x))
            if x is None:
                continue
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            rng = np.random.default_rng([cfg.train.seed, epoch, step, k, 3])
            a = cfg.aug
            x, target = mix_batch(
                x, y, self.num_classes, rng, a.mixup, a.cutmix, a.mix_prob, a.switch_prob, a.label_smoothing
            )
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = k == accum - 1 or not self.dist.enabled
            ctx = contextlib.nullcontext() if sync else self.train_model.no_sync()
            with ctx:
                loss, _ = self._forward_loss(x, target)
                finite &= bool(torch.isfinite(loss))
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.item() * len(x)
            images += len(x)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = cfg.optim.clip_grad if cfg.optim.clip_grad else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.tensor(0.0)
        flag = torch.tensor([0.0 if finite and math.isfinite(float(grad_norm)) else 1.0])
        if all_reduce_sum(flag, self.dist).item() > 0 or images == 0:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # let the scaler back off; not counted as a bad loss
            else:
                self.counters["nonfinite_steps"] += 1
                self._consecutive_nonfinite += 1
                if self._consecutive_nonfinite >= cfg.train.max_nonfinite:
                    raise TrainingAborted(f"{self._consecutive_nonfinite} optimizer steps in a row had a NaN/Inf loss")
            return None
        self._consecutive_nonfinite = 0
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return {"loss": loss_sum / max(images, 1), "lr": lr, "images": images, "grad_norm": float(grad_norm)}

    def fit(self) -> dict:
        """Train to the end of the schedule (or ``train.max_steps``); return the final summary."""
        cfg, accum = self.cfg, self.cfg.optim.accum_steps
        view = TransformView(self.train_set, self.train_tf, cfg.train.seed)
        t_start, images_done = time.perf_counter(), 0
        stop = False
        try:
            while self.epoch < cfg.sched.epochs and not stop:
                epoch = self.epoch
                plan = self._plan(epoch)[: self.steps_per_epoch * accum]
                it = iter(self._loader(plan[self.step_in_epoch * accum :], view))
                self._epoch_failures = []
                bar = self._progress(epoch)
                t_epoch, epoch_images, loss_acc, n_acc = time.perf_counter(), 0, 0.0, 0
                self.model.train()
                while self.step_in_epoch < self.steps_per_epoch:
                    micro = [next(it) for _ in range(accum)]
                    out = self._train_step(micro, epoch, self.step_in_epoch)
                    self.step_in_epoch += 1
                    self.global_step += 1
                    if out is not None:
                        imgs = int(all_reduce_sum(torch.tensor(out["images"]), self.dist))
                        epoch_images += imgs
                        self.counters["images_seen"] += imgs
                        loss_acc += out["loss"]
                        n_acc += 1
                        ips = epoch_images / max(time.perf_counter() - t_epoch, 1e-9)
                        if bar is not None:
                            bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}", img_s=f"{ips:.0f}")
                        if self.log is not None and self.global_step % cfg.train.log_every == 0:
                            self.log.log(dict(kind="step", step=self.global_step, epoch=epoch, img_per_s=ips, **out))
                    if bar is not None:
                        bar.update(1)
                    every = cfg.train.checkpoint_every
                    if every and self.global_step % every == 0 and self.step_in_epoch < self.steps_per_epoch:
                        self.save("last")
                    if cfg.train.max_steps and self.global_step >= cfg.train.max_steps:
                        stop = True
                        break
                if bar is not None:
                    bar.close()
                images_done += epoch_images
                complete = self.step_in_epoch >= self.steps_per_epoch
                if complete:
                    self.epoch, self.step_in_epoch = epoch + 1, 0
                seconds = time.perf_counter() - t_epoch
                self._end_epoch(epoch, loss_acc / max(n_acc, 1), epoch_images, seconds, complete)
            return self.summary(time.perf_counter() - t_start, images_done)
        finally:
            cleanup(self.dist)

    def _progress(self, epoch: int):
        if not (self.cfg.train.progress and self.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {epoch + 1}/{self.cfg.sched.epochs}",
            dynamic_ncols=True,
            disable=None,  # no bar when stderr is not a terminal (logs, CI)
            leave=False,
            file=sys.stderr,
        )

    def _eval_models(self) -> dict:
        out = {}
        if self.val_set is None:
            return out
        view = TransformView(self.val_set, self.eval_tf, 0)
        plan = eval_plan(
            len(self.val_set), self.cfg.data.eval_batch_size, self.size, self.dist.world_size, self.dist.rank
        )
        args = (view, plan, self.num_classes, self.device, self.cfg.train.amp, self.cfg.train.channels_last, self.dist)
        out["model"] = evaluate(self.model, *args)
        if self.ema is not None:
            out["ema"] = evaluate(self.ema.module, *args)
        return out

    def _end_epoch(self, epoch: int, train_loss: float, images: int, seconds: float, complete: bool = True) -> None:
        """Evaluate, save ``last`` (and ``best``), log; a run stopped mid-epoch logs a 'partial' row."""
        self._rng_snapshot = rng_state()  # the RNG as training left it, whatever evaluation does
        results = self._eval_models()
        row = dict(
            kind="epoch" if complete else "partial",
            step=self.global_step,
            epoch=epoch + 1,
            train_loss=train_loss,
            seconds=seconds,
            img_per_s=images / max(seconds, 1e-9),
            bad_images=len(self._epoch_failures),
            nonfinite_steps=self.counters["nonfinite_steps"],
        )
        if "model" in results:
            row.update(
                val_top1=results["model"]["top1"], val_top5=results["model"]["top5"], val_loss=results["model"]["loss"]
            )
        if "ema" in results:
            row.update(ema_top1=results["ema"]["top1"], ema_top5=results["ema"]["top5"])
        self.last_eval = results
        # best = the better of the raw and EMA weights (an EMA lags far behind early on, e.g. with BatchNorm)
        scores = {k: row[f"{k}_top1"] for k in ("val", "ema") if row.get(f"{k}_top1") is not None}
        which = max(scores, key=scores.get) if scores else None
        improved = which is not None and scores[which] > self.best["top1"]
        if improved:
            self.best = {"top1": scores[which], "epoch": epoch + 1, "weights": "ema" if which == "ema" else "model"}
        if self._epoch_failures and self.dist.is_main:
            shown = "; ".join(f"{f.path} ({f.reason})" for f in self._epoch_failures[:5])
            more = len(self._epoch_failures) - 5
            print(
                f"epoch {epoch + 1}: skipped {len(self._epoch_failures)} undecodable image(s): {shown}"
                + (f" and {more} more" if more > 0 else ""),
                file=sys.stderr,
            )
        self.save("last")
        if improved:
            self.save("best")
        self._rng_snapshot = None
        if self.dist.is_main:
            self.log.log(row)
            self.log.plot()
            acc = f"held-out top-1 {row['val_top1']:.4f}" if "val_top1" in row else "no held-out set"
            ema = f" (EMA {row['ema_top1']:.4f})" if "ema_top1" in row else ""
            print(
                f"epoch {epoch + 1}: train loss {train_loss:.4f}, {acc}{ema}, {row['img_per_s']:.0f} img/s, "
                f"{seconds:.1f}s",
                flush=True,
            )

    def summary(self, seconds: float, images: int) -> dict:
        last = getattr(self, "last_eval", {})
        s = {
            "run_dir": str(self.run_dir),
            "model": self.cfg.model.name,
            "epochs": self.epoch,
            "global_step": self.global_step,
            "best_top1": self.best["top1"] if self.best["epoch"] else None,
            "best_epoch": self.best["epoch"],
            "best_weights": self.best.get("weights"),
            "final_top1": last.get("model", {}).get("top1"),
            "final_ema_top1": last.get("ema", {}).get("top1"),
            "seconds": seconds,
            "img_per_s": images / max(seconds, 1e-9),
            **self.counters,
        }
        if self.dist.is_main and "model" in last:
            (self.run_dir / "eval.json").write_text(json.dumps({"summary": s, **last}, indent=2))
            plot_confusion(
                last["model"]["confusion"],
                self.classes,
                self.run_dir / "confusion.png",
                f"{self.cfg.model.name}: held-out top-1 {last['model']['top1']:.4f}",
            )
        return s


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Train from a config (see :mod:`vitkit.train.config`); the Python face of ``vitkit train``."""
    return Trainer(cfg, resume).fit()
