"""Make the Hugging Face transformers parity fixtures in tests/fixtures/hf (the layout of ../shared/golden).

Run with a throwaway venv that has transformers (never a vitkit dependency), from the repository root:

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch==2.13.0 transformers
    /tmp/hfvenv/bin/python benchmarks/segmentation/hf_fixtures.py

For each model: the transformers architecture is built from its config (as published on the Hub for
apple/mobilevit-*, apple/deeplabv3-mobilevit-* and google/vit-base-patch16-224; no download), filled with
``fill.deterministic_state_dict`` (../shared/golden/fill.py) on its own state-dict keys, and run in eval mode on
``fill.golden_input``. ``<name>.json`` holds the keys, shapes and dtypes plus the vitkit model name; ``<name>.npz``
holds ``logits``, ``pre_logits`` (pooled features; for DeepLabv3 the ASPP output) and ``features`` (the
backbone's last map or tokens).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    MobileViTConfig,
    MobileViTForImageClassification,
    MobileViTForSemanticSegmentation,
    ViTConfig,
    ViTForImageClassification,
)

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "hf"
spec = importlib.util.spec_from_file_location("fill", REPO.parent / "shared" / "golden" / "fill.py")
fill = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fill)

MOBILEVIT = {  # the Hub configs' sizes (apple/mobilevit-{xx-small,x-small,small})
    "xxs": dict(hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], expand_ratio=2.0),
    "xs": dict(hidden_sizes=[96, 120, 144], neck_hidden_sizes=[16, 32, 48, 64, 80, 96, 384]),
    "s": dict(hidden_sizes=[144, 192, 240], neck_hidden_sizes=[16, 32, 64, 96, 128, 160, 640]),
}


def run(name: str, model, vitkit_name: str, num_classes: int, shape, outputs) -> None:
    model.eval()
    sd = model.state_dict()
    entries = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in sd.items()]
    filled = fill.deterministic_state_dict(entries)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in filled.items()})
    x = torch.from_numpy(fill.golden_input(*shape))
    with torch.no_grad():
        arrays = {k: v.float().numpy() for k, v in outputs(model, x).items()}
    meta = {"model": vitkit_name, "num_classes": num_classes, "input_shape": list(shape), "state_dict": entries,
            "reference": f"transformers {transformers.__version__}, torch {torch.__version__}, fp32 CPU, eval",
            "source": type(model).__name__}  # fmt: skip
    (OUT / f"{name}.json").write_text(json.dumps(meta))
    np.savez_compressed(OUT / f"{name}.npz", **arrays)
    print(name, {k: v.shape for k, v in arrays.items()})


def classification_outputs(model, x):
    out = model(pixel_values=x, output_hidden_states=True)
    base = model.mobilevit(pixel_values=x) if hasattr(model, "mobilevit") else model.vit(pixel_values=x)
    pooled = base.pooler_output if getattr(base, "pooler_output", None) is not None else base.last_hidden_state[:, 0]
    return {"logits": out.logits, "pre_logits": pooled, "features": base.last_hidden_state}


def segmentation_outputs(model, x):
    hidden = model.mobilevit(pixel_values=x, output_hidden_states=True).hidden_states
    aspp = model.segmentation_head.aspp(hidden[-1])
    return {"logits": model(pixel_values=x).logits, "pre_logits": aspp, "features": hidden[-1]}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for v, sizes in MOBILEVIT.items():
        cfg = MobileViTConfig(num_labels=1000, **sizes)
        run(f"hf_mobilevit_{v}", MobileViTForImageClassification(cfg), f"mobilevit_{v}", 1000, (2, 3, 256, 256),
            classification_outputs)  # fmt: skip
        cfg = MobileViTConfig(num_labels=21, output_stride=16, image_size=512, **sizes)
        run(f"hf_deeplabv3_mobilevit_{v}", MobileViTForSemanticSegmentation(cfg), f"deeplabv3_mobilevit_{v}", 21,
            (2, 3, 256, 256), segmentation_outputs)  # fmt: skip
    cfg = ViTConfig(num_labels=1000)  # google/vit-base-patch16-224: 768 wide, 12 layers, 12 heads, 224 px
    run("hf_vit_base_patch16_224", ViTForImageClassification(cfg), "vit_base_patch16_224", 1000, (2, 3, 224, 224),
        classification_outputs)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
