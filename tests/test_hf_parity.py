"""Hugging Face transformers checkpoints load into vitkit and give transformers' outputs (1e-4 relative).

Fixtures in tests/fixtures/hf were made by transformers itself in a throwaway venv
(``benchmarks/segmentation/hf_fixtures.py`` records the command): each holds the model's transformers state-dict
keys and the outputs for the deterministic weights of ``../shared/golden/fill.py`` (so these tests skip, with the
reason, where that folder is absent, like test_parity.py). Checked the way ../shared/golden is: through the
registry's checkpoint filter, and through ``create_model(checkpoint_path=...)`` from .safetensors and
pytorch_model.bin files. ViT is checked in both transformers layouts (the Hub's / transformers 4
``encoder.layer.N.attention.attention.query`` and transformers 5's ``layers.N.attention.q_proj``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit
from conftest import load_golden, rel_err
from vitkit.models._checkpoint import load_state_dict_into

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def _load(name: str):
    fill = load_golden()
    spec = json.loads((FIXTURES / f"{name}.json").read_text())
    sd = {k: torch.from_numpy(v) for k, v in fill.deterministic_state_dict(spec["state_dict"]).items()}
    return spec, sd, torch.from_numpy(fill.golden_input(*spec["input_shape"])), np.load(FIXTURES / f"{name}.npz")


def _check(model, x, ref, name: str) -> None:
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        assert torch.equal(model(x), logits)
    for key, ours in (("features", feats), ("pre_logits", pre), ("logits", logits)):
        assert tuple(ours.shape) == ref[key].shape, f"{name} {key}: {tuple(ours.shape)} vs {ref[key].shape}"
        err = rel_err(ours.numpy(), ref[key])
        assert err < 1e-4, f"{name} {key}: max|ours - ref| / max|ref| = {err:.3e}"


@pytest.mark.parametrize("name", NAMES)
def test_transformers_checkpoint_parity(name):
    spec, sd, x, ref = _load(name)
    entry = vitkit.get_model_entry(spec["model"])
    model = vitkit.create_model(spec["model"], num_classes=spec["num_classes"])
    load_state_dict_into(model, sd, entry.checkpoint_filter, source=f"transformers fixture {name}")
    _check(model, x, ref, name)


def _v4_layout(sd: dict) -> dict:
    """transformers 5's ViT keys in the Hub's (transformers 4) layout."""
    rules = [(r"\.layers\.(\d+)\.", r".encoder.layer.\1."), (r"attention\.([qkv])_proj\.", r"attention.attention.\1."),
             (r"attention\.attention\.q\.", "attention.attention.query."),
             (r"attention\.attention\.k\.", "attention.attention.key."),
             (r"attention\.attention\.v\.", "attention.attention.value."),
             (r"attention\.o_proj\.", "attention.output.dense."), (r"mlp\.fc1\.", "intermediate.dense."),
             (r"mlp\.fc2\.", "output.dense.")]  # fmt: skip
    out = {}
    for k, v in sd.items():
        for p, r in rules:
            k = re.sub(p, r, k)
        out[k] = v
    return out


@pytest.mark.parametrize("fmt", ["safetensors", pytest.param("bin", marks=pytest.mark.slow)])
def test_transformers_files_load_through_create_model(fmt, tmp_path):
    """The Hub's files: model.safetensors or pytorch_model.bin in transformers 4's layout, via checkpoint_path."""
    spec, sd, x, ref = _load("hf_vit_base_patch16_224")
    sd = _v4_layout(sd)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in sd
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(sd, path)
    model = vitkit.create_model("vit_base_patch16_224", checkpoint_path=path)
    _check(model, x, ref, f"vit ({fmt}, transformers 4 layout)")


def test_a_small_config_round_trips_through_the_transformers_layout():
    """Without fixtures: a tiny MobileViT and ViT, saved in the transformers layout by inverting the conversion's
    renames, load back to the same outputs."""
    from vitkit.models.mobilevit import hf_to_vitkit, vitkit_to_hf

    torch.manual_seed(0)
    model = vitkit.create_model("mobilevit_xxs", num_classes=5, img_size=64).eval()
    hf = vitkit_to_hf(model.state_dict())
    assert any(k.startswith("mobilevit.encoder.layer.2.transformer.layer.0.attention.attention.query") for k in hf)
    back = hf_to_vitkit(hf)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
