"""Multi-scale variable-batch sampler: coverage, constant pixels per batch, determinism, rank disjointness."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from vitkit.data import (
    DEFAULT_RESOLUTIONS,
    MultiScaleDataset,
    VariableBatchSampler,
    multiscale_collate,
    resolution_set,
    variable_batch_schedule,
)


def test_default_resolution_set_is_the_papers():
    assert resolution_set() == [160, 192, 256, 288, 320] == list(DEFAULT_RESOLUTIONS)


def test_cvnets_batch_table():
    # ARCHITECTURES.md §4.3: base 256, 128 per GPU -> 327 / 227 / 128 / 101 / 81 (cvnets truncates)
    sched = variable_batch_schedule(10**6, base_res=256, base_batch=128, seed=3, rounding="floor")
    assert {h: b for h, _, b in sched[:-1]} == {160: 327, 192: 227, 256: 128, 288: 101, 320: 81}
    sched = variable_batch_schedule(10**6, base_res=256, base_batch=128, seed=3)
    assert {h: b for h, _, b in sched[:-1]} == {160: 328, 192: 228, 256: 128, 288: 101, 320: 82}


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3000),
    base_batch=st.integers(1, 64),
    seed=st.integers(0, 10**6),
    epoch=st.integers(0, 50),
)
def test_schedule_properties(n, base_batch, seed, epoch):
    sched = variable_batch_schedule(n, base_batch=base_batch, seed=seed, epoch=epoch)
    assert sum(b for _, _, b in sched) == n  # exact coverage
    for h, w, _b in sched:
        assert h % 32 == 0 and w % 32 == 0 and h in DEFAULT_RESOLUTIONS
    for h, w, b in sched[:-1]:  # pixels per batch constant within rounding (+ the batch >= 1 floor)
        assert b == max(1, round(base_batch * 256 * 256 / (h * w)))
        assert abs(b * h * w - base_batch * 256 * 256) <= max(0.5 * h * w, h * w - base_batch * 256 * 256)
    assert sched == variable_batch_schedule(n, base_batch=base_batch, seed=seed, epoch=epoch)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(8, 2000), replicas=st.integers(1, 8), seed=st.integers(0, 1000), epoch=st.integers(0, 5))
def test_sampler_exact_once_and_ranks_disjoint_in_lockstep(n, replicas, seed, epoch):
    samplers = [
        VariableBatchSampler(n, base_batch=4, num_replicas=replicas, rank=r, seed=seed) for r in range(replicas)
    ]
    for s in samplers:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in samplers]
    assert len({len(p) for p in per_rank}) == 1  # every rank takes the same number of steps
    seen = []
    for steps in zip(*per_rank):
        assert len({(b[0][1], b[0][2]) for b in steps}) == 1  # same resolution on every rank at this step
        for batch in steps:
            assert batch, "no rank gets an empty batch"
            assert len({(h, w) for _, h, w in batch}) == 1
            seen.extend(i for i, _, _ in batch)
    assert sorted(seen) == list(range(n))  # disjoint and complete


def test_order_and_resolutions_deterministic_and_change_with_epoch():
    s = VariableBatchSampler(500, base_batch=8, seed=7)
    first = list(s)
    assert first == list(s)
    assert len(s) == len(first)
    s.set_epoch(1)
    second = list(s)
    assert second != first
    assert len(s) == len(second)


def test_bad_resolution_set_is_rejected():
    with pytest.raises(ValueError, match="multiple of 32"):
        variable_batch_schedule(10, resolutions=(160, 200))
    with pytest.raises(ValueError, match="rank 2 is not in"):
        VariableBatchSampler(10, num_replicas=2, rank=2)


def test_dataloader_path_resizes_each_batch():
    images = torch.rand(40, 3, 64, 64)
    labels = torch.arange(40) % 10
    sampler = VariableBatchSampler(40, resolutions=(32, 64, 96), base_res=64, base_batch=4, seed=1)
    loader = DataLoader(
        MultiScaleDataset(TensorDataset(images, labels)), batch_sampler=sampler, collate_fn=multiscale_collate
    )
    shapes = set()
    total = 0
    for x, y in loader:
        assert x.shape[0] == y.shape[0]
        assert x.shape[-1] == x.shape[-2] and x.shape[-1] in (32, 64, 96)
        shapes.add(tuple(x.shape[1:]))
        total += x.shape[0]
    assert total == 40 and len(shapes) > 1
    # a batch at the native size is passed through untouched
    batch = [(images[i], labels[i], (64, 64)) for i in range(3)]
    x, _ = multiscale_collate(batch)
    assert torch.equal(x, images[:3])
    with pytest.raises(ValueError, match="share one resolution"):
        multiscale_collate([(images[0], 0, (32, 32)), (images[1], 1, (64, 64))])


def test_rounding_example_is_exact():
    for h, b in itertools.islice(((h, b) for h, _, b in variable_batch_schedule(5000, base_batch=16)), 10):
        assert b == round(16 * 256 * 256 / (h * h))
