"""Shared test helpers: the reference-parity fixtures in ../shared/golden and small-model factories."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("VITKIT_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"
MNIST = SHARED / "data" / "mnist"

# under pytest-xdist (``-n N``) the cores are shared among the workers, so each takes its share of threads
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _WORKERS)))


# one small registered model per family (ViT, hybrid ViT, NesT, LaViT, MobileViT, HaloNet): for checks each family
# wires on its own (input checks, gradient checkpointing, ...)
ONE_PER_FAMILY = [
    "vit_tiny_patch16_224",
    "vit_tiny_r_s16_p8_224",
    "nest_tiny",
    "lavit_tiny",
    "mobilevit_xxs",
    "halonet26t",
    "swin_tiny_patch4_window7_224",
    "pvt_tiny",
    "axial_vit_tiny_patch16_224",
    "deepvit_tiny",
]


# the families the registry-wide contract tests run whole in the default run; a family added later runs its
# ONE_PER_FAMILY representative there and its other variants in the slow run (keeps the default run under 10 min)
ESTABLISHED_FAMILIES = {"vit", "vit_hybrid", "nest", "lavit", "mobilevit", "halonet"}


def _family(name: str) -> str:
    return vitkit.get_model_entry(name).family


# the representatives whose heavier per-family checks (export, float64, checkpointing, bad input) run in the default
# run; the later families' representatives run them in the slow run, and their lighter contract tests by default
HEAVY_DEFAULT = [n for n in ONE_PER_FAMILY if _family(n) in ESTABLISHED_FAMILIES]


def slow_except(names, fast) -> list:
    """``names`` as test parameters, all but those in ``fast`` marked ``slow`` (the default run keeps a
    representative of each kind; ``make test-slow`` runs the rest)."""
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


def golden_names() -> list[str]:
    return sorted(p.stem for p in GOLDEN.glob("*.json")) if GOLDEN.is_dir() else []


def load_golden():
    """Import the fixture helper module ``fill.py`` from the shared folder, or skip."""
    if not (GOLDEN / "fill.py").is_file():
        pytest.skip(f"reference fixtures not found at {GOLDEN} (they live in ../shared beside a CI clone)")
    spec = importlib.util.spec_from_file_location("vitkit_golden_fill", GOLDEN / "fill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def input_size_for(name: str) -> tuple[int, int, int]:
    cfg = vitkit.get_model_entry(name).default_cfg
    return tuple(cfg.get("test_input_size") or cfg["input_size"])


def small_model(name: str, **kwargs) -> torch.nn.Module:
    """A model at its small test resolution, seeded for reproducibility."""
    torch.manual_seed(0)
    c, h, w = input_size_for(name)
    return vitkit.create_model(name, img_size=(h, w), **kwargs)


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
