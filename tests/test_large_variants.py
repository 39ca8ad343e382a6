"""Each family's largest registered variant, really run: a forward and backward pass at its small test resolution.

The registry-wide contract tests (test_models_contract.py) run every model up to 40M parameters; above that they
count parameters on the meta device only. These slow checks (``make test-slow``) build the largest variant of
every family with real weights (vit_huge_patch14_224 is 632M parameters, 2.5 GB in fp32; gradients double it),
and check that the output is finite and every parameter gets a finite gradient (as the contract tests do).
"""

from __future__ import annotations

import pytest
import torch

import vitkit
from conftest import input_size_for, small_model
from vitkit.bench import count_params
from vitkit.tasks import model_task


def largest_per_family() -> list[str]:
    out = []
    for family in vitkit.list_families():
        sizes = {}
        for name in vitkit.list_models(family=family):
            if model_task(name) != "classification":
                continue
            with torch.device("meta"):
                sizes[name] = count_params(vitkit.create_model(name))
        if sizes:
            out.append(max(sizes, key=sizes.get))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", largest_per_family())
def test_largest_variant_runs_forward_and_backward(name):
    model = small_model(name, num_classes=5).train()
    x = torch.randn(2, *input_size_for(name))
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: parameters without a finite gradient: {bad[:5]}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
