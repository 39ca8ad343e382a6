"""Held-out evaluation for any task: the one path ``vitkit train`` (every epoch), ``vitkit eval`` and the
benchmarks use. The task says what a batch is and what to count (:meth:`vitkit.tasks.Task.evaluate`); this
module builds the in-order, rank-sharded batches and moves them to the device."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from vitkit.data.loader import TransformView, eval_plan
from vitkit.runtime import to_device
from vitkit.tasks import EvalContext, Task


def batches(
    view, plan: list, collate, device: torch.device, channels_last: bool = False, num_workers: int = 0
) -> Iterator[tuple]:
    """``(inputs, targets, failures)`` per planned batch, on ``device``; ``inputs`` is None when all failed."""
    # a private generator: evaluating must not draw from the global RNG (a resumed run would diverge)
    loader = DataLoader(
        view, batch_sampler=plan, collate_fn=collate, num_workers=num_workers, generator=torch.Generator()
    )
    for x, y, failed in loader:
        if x is not None:
            x, y = to_device(x, device), to_device(y, device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        yield x, y, failed


def evaluate(
    task: Task,
    model: nn.Module,
    dataset,
    data_config: dict,
    batch_size: int = 256,
    ctx: EvalContext | None = None,
    channels_last: bool = False,
    num_workers: int = 0,
) -> dict:
    """The task's metrics for ``model`` over ``dataset`` with its eval transform (every rank gets the totals)."""
    ctx = dataclasses.replace(ctx or EvalContext(), dataset=dataset)
    size = tuple(data_config["input_size"][1:])
    view = TransformView(dataset, task.eval_transform(data_config), 0, joint=True)
    plan = eval_plan(len(dataset), batch_size, size, ctx.dist.world_size, ctx.dist.rank)
    was_training = model.training
    model.eval()
    try:
        return task.evaluate(model, batches(view, plan, task.collate, ctx.device, channels_last, num_workers), ctx)
    finally:
        model.train(was_training)
