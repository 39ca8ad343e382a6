"""MobileViT's multi-scale sampler with variable batch size (MSc-VBS, ARCHITECTURES.md §4.3).

At each iteration a resolution (H_t, W_t) is drawn from a set S and the batch is
``b_t = round(b_base * H_base * W_base / (H_t * W_t))``, so every batch holds about the same number of
pixels: small images come in big batches, large ones in small batches. Following cvnets, the base is
the base crop (256), not the largest size. cvnets truncates the batch (``int``) where the formula rounds;
``rounding="floor"`` reproduces its table exactly. The schedule is a pure function of
``(num_samples, resolutions, base, seed, epoch, num_replicas)``; the sampler only slices it.

Distributed use: all ranks compute the same schedule and the same permutation; at every step the
global batch ``b_t * num_replicas`` is split into disjoint per-rank chunks, so ranks see the same
resolution at the same step and together see every index of the epoch exactly once. The last step takes
what is left (split as evenly as possible); a tail too small to give every rank an image joins the step
before it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

DEFAULT_RESOLUTIONS = (160, 192, 256, 288, 320)


def resolution_set(base: int = 256, min_res: int = 160, max_res: int = 320, n: int = 5, divisor: int = 32) -> list[int]:
    """cvnets' set: ``linspace(min, max, n)`` plus the base, each rounded to a multiple of ``divisor``."""
    vals = [int(v + divisor / 2) // divisor * divisor for v in np.linspace(min_res, max_res, n)] + [base]
    return sorted(set(vals))


def _as_pairs(resolutions: Sequence, divisor: int) -> list[tuple[int, int]]:
    pairs = [(int(r), int(r)) if np.isscalar(r) else (int(r[0]), int(r[1])) for r in resolutions]
    if not pairs:
        raise ValueError("multi-scale sampler: the resolution set is empty")
    bad = [p for p in pairs if p[0] % divisor or p[1] % divisor or min(p) <= 0]
    if bad:
        raise ValueError(f"multi-scale sampler: every resolution must be a positive multiple of {divisor}, got {bad}")
    return pairs


def variable_batch_schedule(
    num_samples: int,
    resolutions: Sequence = DEFAULT_RESOLUTIONS,
    base_res: int | tuple[int, int] = 256,
    base_batch: int = 128,
    seed: int = 0,
    epoch: int = 0,
    num_replicas: int = 1,
    divisor: int = 32,
    rounding: str = "round",
) -> list[tuple[int, int, int]]:
    """Per-iteration ``(height, width, global_batch)`` covering ``num_samples`` images once.

    ``global_batch`` is ``b_t * num_replicas`` with ``b_t = round(base_batch * Hb * Wb / (Ht * Wt))``
    (at least 1), except at the end of the epoch where it is what remains.
    """
    if num_samples < num_replicas:
        raise ValueError(f"multi-scale sampler: {num_samples} samples cannot feed {num_replicas} replicas")
    if rounding not in ("round", "floor"):
        raise ValueError(f"multi-scale sampler: rounding must be 'round' or 'floor', got {rounding!r}")
    to_int = round if rounding == "round" else int
    pairs = _as_pairs(resolutions, divisor)
    bh, bw = (base_res, base_res) if np.isscalar(base_res) else base_res
    rng = np.random.default_rng([seed, epoch, 1])
    steps: list[list[int]] = []
    remaining = num_samples
    while remaining > 0:
        h, w = pairs[int(rng.integers(len(pairs)))]
        b = max(1, to_int(base_batch * bh * bw / (h * w)))
        g = min(b * num_replicas, remaining)
        steps.append([h, w, g])
        remaining -= g
    if len(steps) > 1 and steps[-1][2] < num_replicas:
        steps[-2][2] += steps.pop()[2]
    return [tuple(s) for s in steps]


class VariableBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Batch sampler yielding ``[(index, height, width), ...]`` per step for this rank.

    Use with ``DataLoader(MultiScaleDataset(ds), batch_sampler=sampler, collate_fn=multiscale_collate)``
    and call :meth:`set_epoch` every epoch.
    """

    def __init__(
        self,
        num_samples: int,
        resolutions: Sequence = DEFAULT_RESOLUTIONS,
        base_res: int | tuple[int, int] = 256,
        base_batch: int = 128,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"VariableBatchSampler: rank {rank} is not in [0, {num_replicas})")
        self.num_samples, self.resolutions, self.base_res = num_samples, resolutions, base_res
        self.base_batch, self.num_replicas, self.rank = base_batch, num_replicas, rank
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        _as_pairs(resolutions, 32)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _schedule(self):
        return variable_batch_schedule(
            self.num_samples,
            self.resolutions,
            self.base_res,
            self.base_batch,
            self.seed,
            self.epoch,
            self.num_replicas,
        )

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        start = 0
        for h, w, g in self._schedule():
            chunk = np.array_split(order[start : start + g], self.num_replicas)[self.rank]
            start += g
            yield [(int(i), h, w) for i in chunk]

    def __len__(self) -> int:
        return len(self._schedule())


class MultiScaleDataset(Dataset):
    """Wraps a dataset of ``(image CHW tensor, target)`` so it can be indexed by ``(index, height, width)``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]):
        idx, h, w = key
        img, target = self.dataset[idx]
        return img, target, (h, w)


def multiscale_collate(batch: list, antialias: bool = True):
    """Resize every image of a batch to the batch's sampled size (bilinear) and stack: ``(x, y)``."""
    sizes = {b[2] for b in batch}
    if len(sizes) != 1:
        raise ValueError(f"multiscale_collate: one batch must share one resolution, got {sorted(sizes)}")
    (h, w) = sizes.pop()
    imgs = []
    for img, _, _ in batch:
        img = torch.as_tensor(img, dtype=torch.float32)
        if tuple(img.shape[-2:]) != (h, w):
            img = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False, antialias=antialias)[0]
        imgs.append(img)
    targets = torch.as_tensor([b[1] for b in batch])
    return torch.stack(imgs), targets
