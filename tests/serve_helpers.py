"""A tiny real run for the ``vitkit serve`` tests: a two-level NesT trained for one epoch on 256 real MNIST digits
(the held-out split is 50 other digits), made once per test session and shared by test_serve*.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import MNIST, REPO

TINY_NEST = (
    "model.kwargs={patch_size: 4, num_levels: 2, embed_dims: [32, 32], num_heads: [2, 2], depths: [1, 1], "
    "attn_type: mha}"
)


def need_serve_extra() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"the serve extra is not installed ({', '.join(missing)} missing): pip install -e '.[serve]'",
            allow_module_level=True,
        )


def tiny_mnist_run(base: Path, images: int = 256, epochs: int = 1, name: str = "serve-run") -> Path:
    """The run folder, trained on the first call in this session's temporary folder (``images`` training digits
    for ``epochs``; the defaults are the serve tests' run)."""
    if not any(MNIST.glob("t10k-images*")):
        pytest.skip(f"the real MNIST digits are not at {MNIST} (they live in ../shared beside a CI clone)")
    run = base / name
    if (run / "checkpoints" / "best" / "model.safetensors").is_file():
        return run
    from vitkit.train import Trainer, load_config

    sets = [
        TINY_NEST,
        f"data.root={MNIST}",
        f"data.train_split=test[:{images}]",
        "data.val_split=test[9950:]",
        f"sched.epochs={epochs}",
        "sched.warmup_epochs=0",
        "train.progress=false",
        f"train.output={run}",
    ]
    Trainer(load_config(REPO / "configs" / "mnist_nest.yaml", sets)).fit()
    return run
