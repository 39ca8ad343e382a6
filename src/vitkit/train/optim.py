"""Optimizer with no-weight-decay groups, a stateless warmup + cosine schedule, and EMA weights."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from vitkit.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and undecayed biases/norms/1-D params plus ``model.no_weight_decay()``."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    name = cfg.name.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {cfg.name!r}")


def build_optimizers(model: nn.Module, task, cfg: OptimConfig):
    """The optimizer of a run: one over the whole model, or one per phase of a task that declares phases
    (:meth:`vitkit.tasks.Task.optim_phases`), each phase's learning rate scaled by its ``lr_scale``."""
    phases = task.optim_phases(model)
    if phases is None:
        return build_optimizer(model, cfg)
    out = {}
    for name, phase in phases.items():
        out[name] = opt = build_optimizer(phase.module, cfg)
        for g in opt.param_groups:
            g["lr_scale"] = phase.lr_scale
    return out


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, sched: ScheduleConfig) -> float:
    """Linear warm-up from ``warmup_lr`` to ``base_lr``, then cosine decay to ``min_lr`` at ``total_steps``.

    A pure function of the step, so resuming needs nothing but the step count.
    """
    if step < warmup_steps:
        return sched.warmup_lr + (base_lr - sched.warmup_lr) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return sched.min_lr + 0.5 * (base_lr - sched.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


class ModelEma(nn.Module):
    """Exponential moving average of a model's weights (buffers are copied): ``ema = d * ema + (1 - d) * w``."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m.detach(), 1.0 - self.decay)
            else:
                e.copy_(m)
