"""Held-out evaluation for any task: the one path ``vitkit train`` (every epoch), ``vitkit eval`` and the
benchmarks use. The task says what a batch is and what to count (:meth:`vitkit.tasks.Task.evaluate`); this
module builds the in-order, rank-sharded batches and moves them to the device. :func:`linear_probe` is the few-shot
linear evaluation of any classification or masked_patch run (``vitkit eval RUN --linear-probe K``)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from vitkit.data.datasets import DATASETS
from vitkit.data.loader import TransformView, collate_skip, eval_plan
from vitkit.data.transforms import EvalTransform
from vitkit.runtime import to_device
from vitkit.tasks import EvalContext, Task
from vitkit.tasks.classification.linear_probe import L2_REG, SEEDS, dataset_labels, few_shot_indices, probe_accuracies


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


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode for the block, back in the mode it was in afterwards (also on an error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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
    with eval_mode(model):
        return task.evaluate(model, batches(view, plan, task.collate, ctx.device, channels_last, num_workers), ctx)


@torch.no_grad()
def image_features(
    task: Task, model: nn.Module, dataset, data_config: dict, batch_size: int = 256, device=None
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Frozen features ``(N, D)`` (:meth:`Task.features`, eval transform of a classifier) and labels of ``dataset``'s
    readable images, on the CPU, and the failures. ``device``: where the model runs (default: where it is)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    size = tuple(data_config["input_size"][1:])
    view = TransformView(dataset, EvalTransform.from_data_config(data_config), 0)  # (image tensor, label)
    feats, labels, failures = [], [], []
    with eval_mode(model):
        for x, y, failed in batches(view, eval_plan(len(dataset), batch_size, size), collate_skip, device):
            failures += failed
            if x is not None:
                feats.append(task.features(model, x).float().cpu())
                labels.append(y.cpu())
    if not feats:
        raise ValueError(f"linear probe: none of the {len(dataset)} images could be read")
    return torch.cat(feats), torch.cat(labels), failures


def linear_probe(
    task: Task,
    model: nn.Module,
    shot_set,
    eval_set,
    data_config: dict,
    shots: list[int],
    seeds: int = SEEDS,
    l2: float = L2_REG,
    batch_size: int = 256,
    device=None,
) -> dict:
    """Few-shot linear evaluation (:mod:`vitkit.tasks.classification.linear_probe`): for each K of ``shots`` and each
    seed, K images per class of ``shot_set`` fit a least-squares probe on ``model``'s frozen features, scored on every
    image of ``eval_set``. Only the drawn images of ``shot_set`` are read."""
    if not shots or min(shots) < 1:
        raise ValueError(f"linear probe: shots must be >= 1 images per class, got {shots}")
    dataset = task.cfg.data.dataset
    if dataset.lower().replace("-", "_") not in DATASETS:
        known = ", ".join(DATASETS)
        raise ValueError(f"linear probe: needs labelled images ({known}); the run's dataset is {dataset!r}")
    shots = sorted(set(shots))
    classes = list(getattr(shot_set, "classes", []))
    labels = dataset_labels(shot_set)
    num_classes = len(classes) or int(labels.max()) + 1
    draws = [few_shot_indices(labels, num_classes, shots, seed) for seed in range(seeds)]
    drawn = np.unique(np.concatenate([idx for d in draws for idx in d.values()]))
    train_x, train_y, failed = image_features(task, model, Subset(shot_set, drawn.tolist()), data_config, batch_size,
                                              device)  # fmt: skip
    if failed:
        raise ValueError(f"linear probe: drawn images could not be read: {', '.join(f.path for f in failed[:5])}")
    if not torch.equal(train_y, torch.from_numpy(labels[drawn])):
        raise RuntimeError("linear probe: the dataset's labels differ from the labels its images come with")
    row = {int(i): r for r, i in enumerate(drawn)}
    draws = [{k: np.array([row[int(i)] for i in idx]) for k, idx in d.items()} for d in draws]
    test_x, test_y, failed = image_features(task, model, eval_set, data_config, batch_size, device)
    return {
        "shots": probe_accuracies(train_x, train_y, test_x, test_y, num_classes, draws, l2),
        "l2": l2,
        "seeds": seeds,
        "classes": num_classes,
        "feature_dim": int(train_x.shape[1]),
        "shot_images": len(drawn),
        "eval_images": len(test_y),
        "failed_eval_images": len(failed),
    }
