"""One optimizer step, for any task: the step ``vitkit train`` runs and ``vitkit bench --train`` times.

A step takes ``optim.accum_steps`` micro-batches. For each: the task's batch augmentation (``prepare``, with a
generator keyed by the run's seed, epoch, step and micro-batch, so a resumed run draws the same), then under
autocast the task's loss terms plus the model's own weighted terms (``train.extra_loss_weights`` over
``model.extra_losses()``, e.g. LaViT's DP loss), then ``backward`` of their sum divided by the number of
micro-batches (under DDP, gradients are synchronised on the last micro-batch only). Then fp16 unscaling,
clipping and the optimizer and EMA updates, unless a loss or the gradient norm is non-finite on any rank: the
gradients are then dropped and the step reports itself skipped.

A task may split the step into *phases* (:meth:`vitkit.tasks.Task.optim_phases`, e.g. a GAN's discriminator then
generator): each phase has its own optimizer over its own parameters and runs the above in turn on the same
micro-batches (``losses`` gets the phase's name; the parameters of the other phases are frozen meanwhile), and the
EMA is updated once, after the last phase. A task without phases gets exactly the single step above.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vitkit.config import OptimConfig, RunConfig
from vitkit.runtime import DistInfo, all_reduce_sum, autocast, to_device
from vitkit.tasks import Task
from vitkit.train.optim import ModelEma


@dataclass
class StepResult:
    """What one step did: ``skipped`` is None, 'nonfinite' (a NaN/Inf loss or gradient), 'scaler' (fp16 backed
    off) or 'empty' (every image of the step failed to decode)."""

    loss: float = float("nan")
    terms: dict | None = None  # mean of each named loss term, when there is more than one
    lr: float = 0.0
    images: int = 0
    grad_norm: float = float("nan")
    skipped: str | None = None
    stepped: bool | None = None  # an optimizer stepped (default: not skipped; with phases: some phase stepped)

    def __post_init__(self):
        if self.stepped is None:
            self.stepped = self.skipped is None


def _merge(results: list[StepResult], terms: dict, lr: float) -> StepResult:
    """One result for a step of several phases: losses summed, every phase's terms, the gradient norm over all
    phases, the first phase's reason to skip (if any skipped)."""
    skipped = next((r.skipped for r in results if r.skipped is not None), None)
    norms = [r.grad_norm for r in results if r.skipped is None]
    return StepResult(
        loss=sum(r.loss for r in results),
        terms=terms,
        lr=lr,
        images=max(r.images for r in results),
        grad_norm=math.sqrt(sum(n * n for n in norms)) if norms else float("nan"),
        skipped=skipped,
        stepped=any(r.stepped for r in results),
    )


class TrainStep:
    """The optimizer step over micro-batches of ``(inputs, targets)``, with everything the loop configures.

    Args:
        model: the model whose parameters are stepped (and whose ``extra_losses()`` are read).
        task: supplies ``prepare`` and ``losses``.
        optimizer: built over ``model``'s parameters, or one per phase (name -> optimizer over that phase's
            parameters, in the order the phases run; see :func:`vitkit.train.optim.build_optimizers`).
        run: the ``train`` config section (amp, channels_last, extra_loss_weights, seed).
        optim: the ``optim`` config section (accum_steps, clip_grad).
        forward_model: what runs the forward (``model`` wrapped in DDP or compiled); default ``model``.
        ema: EMA weights to update after each step.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        optimizer: torch.optim.Optimizer | dict[str, torch.optim.Optimizer],
        run: RunConfig,
        optim: OptimConfig,
        device: torch.device,
        dist: DistInfo | None = None,
        forward_model: nn.Module | None = None,
        ema: ModelEma | None = None,
    ):
        self.model, self.task, self.run, self.optim = model, task, run, optim
        self.optimizers = dict(optimizer) if isinstance(optimizer, dict) else {None: optimizer}
        self.device, self.dist, self.ema = device, dist or DistInfo(), ema
        self.forward_model = forward_model or model
        self.scaler = torch.amp.GradScaler("cuda") if run.amp == "fp16" else None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of a single-phase step."""
        if len(self.optimizers) != 1 or None not in self.optimizers:
            raise AttributeError(f"this step has one optimizer per phase: {list(self.optimizers)}")
        return self.optimizers[None]

    def optimizer_state(self) -> dict:
        """The optimizer state for a checkpoint: the optimizer's ``state_dict``, or ``{phase: state_dict}``."""
        if None in self.optimizers:
            return self.optimizer.state_dict()
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_optimizer_state(self, state: dict) -> None:
        """Restore what :meth:`optimizer_state` saved (the phases must be the same)."""
        if None in self.optimizers:
            self.optimizer.load_state_dict(state)
            return
        if set(state) != set(self.optimizers):
            raise ValueError(
                f"checkpoint holds optimizers for phases {sorted(state)}; the task has {list(self.optimizers)}"
            )
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])

    def losses(self, inputs: torch.Tensor, targets, phase: str | None = None) -> dict[str, torch.Tensor]:
        """The task's loss terms for one micro-batch (of ``phase``, when the task has phases) plus the model's
        weighted extra terms."""
        with autocast(self.device, self.run.amp):
            if phase is None:
                terms = dict(self.task.losses(self.forward_model, inputs, targets))
            else:
                terms = dict(self.task.losses(self.forward_model, inputs, targets, phase=phase))
        weights = self.run.extra_loss_weights
        if weights:
            extra = self.model.extra_losses() if hasattr(self.model, "extra_losses") else {}
            unknown = set(weights) - set(extra)
            if unknown:
                raise ValueError(f"train.extra_loss_weights names {sorted(unknown)}; the model gives {sorted(extra)}")
            for k, w in weights.items():
                terms[k] = float(w) * extra[k].float()
        return terms

    def __call__(self, micro_batches: list, lr: float, key: tuple[int, ...] = (0, 0, 0)) -> StepResult:
        """One step over ``[(inputs, targets), ...]`` (``inputs`` None: every image of it failed) at ``lr``;
        ``key`` = (seed, epoch, step) keys the batch augmentation (the same in every phase)."""
        if None in self.optimizers:
            result, _ = self._phase(None, self.optimizer, micro_batches, lr, key)
        else:
            results, terms = [], {}
            for phase, optimizer in self.optimizers.items():
                params = {id(p) for g in optimizer.param_groups for p in g["params"]}
                frozen = [p for p in self.model.parameters() if p.requires_grad and id(p) not in params]
                for p in frozen:  # no gradients for the other phases' parameters
                    p.requires_grad_(False)
                try:
                    r, t = self._phase(phase, optimizer, micro_batches, lr, key)
                finally:
                    for p in frozen:
                        p.requires_grad_(True)
                results.append(r)
                terms.update(t)
            result = _merge(results, terms, lr)
        if self.ema is not None and result.stepped:
            self.ema.update(self.model)
        return result

    def _phase(self, phase, optimizer, micro_batches: list, lr: float, key: tuple[int, ...]) -> tuple[StepResult, dict]:
        """Forward/backward over the micro-batches and the optimizer step of one phase; also each term's mean."""
        accum = len(micro_batches)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss_sum, term_sums, images, finite = 0.0, {}, 0, True
        for k, (x, y) in enumerate(micro_batches):
            if x is None:
                continue
            x, y = to_device(x, self.device, True), to_device(y, self.device, True)
            x, y = self.task.prepare(x, y, np.random.default_rng([*key, k, 3]))
            if self.run.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = k == accum - 1 or not self.dist.enabled
            with contextlib.nullcontext() if sync else self.forward_model.no_sync():
                terms = self.losses(x, y) if phase is None else self.losses(x, y, phase)
                loss = None
                for t in terms.values():
                    loss = t if loss is None else loss + t
                finite &= bool(torch.isfinite(loss))
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.item() * len(x)
            for name, t in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + t.item() * len(x)
            images += len(x)
        result = self._apply(optimizer, lr, finite, loss_sum, term_sums, images)
        return result, {k: v / max(images, 1) for k, v in term_sums.items()}

    def _apply(self, optimizer, lr: float, finite: bool, loss_sum: float, term_sums: dict, images: int) -> StepResult:
        """Clip and step, or drop the gradients of a non-finite (or empty) step on every rank alike."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        clip = self.optim.clip_grad if self.optim.clip_grad else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.tensor(0.0)
        # [any non-finite, any empty] over all ranks, so that every rank skips or steps alike
        bad = torch.tensor([float(not (finite and math.isfinite(float(grad_norm)))), float(images == 0)])
        nonfinite, empty = (v > 0 for v in all_reduce_sum(bad, self.dist).tolist())
        if nonfinite or empty:
            optimizer.zero_grad(set_to_none=True)
            if empty and not nonfinite:
                return StepResult(lr=lr, skipped="empty")
            if self.scaler is not None:
                self.scaler.update()  # let the scaler back off; not counted as a bad loss
                return StepResult(lr=lr, skipped="scaler")
            return StepResult(lr=lr, images=images, skipped="nonfinite")
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        n = max(images, 1)
        terms = {k: v / n for k, v in term_sums.items()} if len(term_sums) > 1 else None
        return StepResult(loss_sum / n, terms, lr, images, float(grad_norm))
