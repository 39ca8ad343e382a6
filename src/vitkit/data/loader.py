"""The training/eval input pipeline: keyed per-sample randomness, guarded decoding, exact batch plans.

A batch plan is a pure function of ``(num_samples, batch, seed, epoch, world size)``; a resumed run
starts the same plan at the step it stopped at. Each sample is addressed by a key
``(index, epoch, height, width)`` and augmented with a generator seeded from ``(seed, epoch, index)``.
Images that fail to decode come back as :class:`Failed` and are dropped by :func:`collate_skip`, which
reports them so the loop can count them and abort after too many in a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from vitkit.data.images import ImageDecodeError
from vitkit.data.sampler import VariableBatchSampler

Key = tuple[int, int, int, int]  # (index, epoch, height, width)


@dataclass(frozen=True)
class Failed:
    path: str
    reason: str


class TransformView(Dataset):
    """``dataset[index]`` -> ``(transform(img, rng, (h, w)), target)`` with ``rng`` seeded from ``(seed, epoch,
    index)``; ``joint=True``: ``transform(img, target, rng, (h, w))`` returns both (a task's sample transform, which
    may move boxes or masks with the image)."""

    def __init__(self, dataset: Dataset, transform, seed: int = 0, joint: bool = False):
        self.dataset, self.transform, self.seed, self.joint = dataset, transform, seed, joint

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Key):
        idx, epoch, h, w = key
        try:
            img, label = self.dataset[idx]
        except ImageDecodeError as e:
            return Failed(e.path, e.reason)
        rng = np.random.default_rng([self.seed, epoch, idx, 7])
        if self.joint:
            return self.transform(img, label, rng, (h, w))
        return self.transform(img, rng, (h, w)), label


def collate_skip(batch: list):
    """Stack the good samples; return ``(x, y, failures)``. ``x`` is None when every sample failed. Targets that
    are tensors (masks, per-patch classes) are stacked; others (class indices) become an int64 vector."""
    good = [b for b in batch if not isinstance(b, Failed)]
    failed = [b for b in batch if isinstance(b, Failed)]
    if not good:
        return None, None, failed
    x = torch.stack([b[0] for b in good])
    targets = [b[1] for b in good]
    y = torch.stack(targets) if isinstance(targets[0], torch.Tensor) else torch.as_tensor(targets, dtype=torch.long)
    return x, y, failed


def batch_plan(
    num_samples: int,
    batch_size: int,
    size: tuple[int, int],
    epoch: int,
    seed: int = 0,
    world_size: int = 1,
    rank: int = 0,
    multiscale: dict | None = None,
) -> list[list[Key]]:
    """This rank's micro-batches for one epoch, as lists of keys.

    Fixed size: a (seed, epoch) permutation cut into global batches of ``batch_size * world_size``
    (the incomplete tail is dropped, so every step has the same global batch), each split into
    contiguous per-rank chunks. Multi-scale (``multiscale=dict(resolutions=..., base_res=...)``): MobileViT's
    variable-batch schedule with ``batch_size`` as the base batch.
    """
    if multiscale:
        sampler = VariableBatchSampler(
            num_samples,
            resolutions=multiscale["resolutions"],
            base_res=multiscale.get("base_res", size[0]),
            base_batch=batch_size,
            num_replicas=world_size,
            rank=rank,
            seed=seed,
        )
        sampler.set_epoch(epoch)
        return [[(i, epoch, h, w) for i, h, w in b] for b in sampler]
    global_batch = batch_size * world_size
    if num_samples < global_batch:
        raise ValueError(f"the training set holds {num_samples} images, fewer than one global batch ({global_batch})")
    order = np.random.default_rng([seed, epoch, 0]).permutation(num_samples)
    plan = []
    for s in range(num_samples // global_batch):
        chunk = order[s * global_batch + rank * batch_size : s * global_batch + (rank + 1) * batch_size]
        plan.append([(int(i), epoch, size[0], size[1]) for i in chunk])
    return plan


def eval_plan(num_samples: int, batch_size: int, size: tuple[int, int], world_size: int = 1, rank: int = 0):
    """In-order eval batches, this rank's contiguous shard (ranks' shards together cover every image once)."""
    shard = np.array_split(np.arange(num_samples), world_size)[rank]
    return [
        [(int(i), 0, size[0], size[1]) for i in shard[s : s + batch_size]] for s in range(0, len(shard), batch_size)
    ]
