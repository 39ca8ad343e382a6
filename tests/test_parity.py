"""Reference parity: every fixture in ../shared/golden, loaded through vitkit's checkpoint conversion.

Fixtures come from timm 1.0.31 (see golden/README.md). The test is parametrised over whatever fixtures
exist, so fixtures for other variants are checked the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitkit
from conftest import GOLDEN, golden_names, load_golden, rel_err
from vitkit.models._checkpoint import load_state_dict_into

NAMES = golden_names() or ["<no fixtures>"]


@pytest.mark.parametrize("name", NAMES)
def test_reference_parity(name):
    fill = load_golden()
    spec = fill.load_spec(name)
    arch = spec["model"]
    if arch not in vitkit.list_models():
        pytest.skip(f"{arch}: family not implemented in vitkit yet")
    entry = vitkit.get_model_entry(arch)
    sd = {k: torch.from_numpy(v) for k, v in fill.deterministic_state_dict(spec["state_dict"]).items()}
    model = vitkit.create_model(arch, num_classes=spec["num_classes"], **spec.get("create_kwargs", {})).eval()
    load_state_dict_into(model, sd, entry.checkpoint_filter, source=f"golden fixture {name}")
    x = torch.from_numpy(fill.golden_input(*spec["input_shape"]))
    ref = np.load(GOLDEN / f"{name}.npz")
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        full = model(x)
    for key, ours in (("features", feats), ("pre_logits", pre), ("logits", logits)):
        assert tuple(ours.shape) == ref[key].shape, f"{name} {key}: shape {tuple(ours.shape)} vs {ref[key].shape}"
        err = rel_err(ours.numpy(), ref[key])
        assert err < 1e-4, f"{name} {key}: max|ours - ref| / max|ref| = {err:.3e}"
    assert torch.equal(full, logits)
