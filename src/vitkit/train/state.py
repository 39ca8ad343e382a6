"""Run checkpoints: ``checkpoints/<name>/{model.safetensors, ema.safetensors, state.pt}``, written atomically.

The three files are written into a fresh temporary folder (each fsync'd), which then replaces the old
folder by rename: ``<name>`` -> ``.<name>.old``, temp -> ``<name>``, remove the old one. A crash at any point
leaves a complete ``<name>`` or a complete ``.<name>.old``, and :func:`find_checkpoint` takes whichever is
whole. Weights are safetensors; the state file holds only tensors, numbers, strings and containers, and
is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vitkit._io import fsync_dir
from vitkit.models._checkpoint import EMA_FILE, MODEL_FILE, STATE_FILE, read_state_dict


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _finite(module: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.dtype.is_floating_point)


def _save_weights(module: nn.Module, path: str) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(sd, path, metadata={"format": "pt", "vitkit.model": getattr(module, "model_name", "")})
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(ckpt_root: Path, name: str, model: nn.Module, ema: nn.Module | None, state: dict) -> Path:
    """Write ``ckpt_root/name`` atomically. A model with NaN/Inf weights is refused, never saved."""
    if not _finite(model) or (ema is not None and not _finite(ema)):
        raise RuntimeError(f"refusing to save checkpoint {name!r}: the model holds NaN/Inf values")
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=ckpt_root))
    try:
        _save_weights(model, str(tmp / MODEL_FILE))
        if ema is not None:
            _save_weights(ema, str(tmp / EMA_FILE))
        torch.save(state, tmp / STATE_FILE)
        with open(tmp / STATE_FILE, "rb+") as f:
            os.fsync(f.fileno())
        fsync_dir(tmp)
        final, old = ckpt_root / name, ckpt_root / f".{name}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ckpt_root / name


def load_checkpoint_dir(folder: Path) -> tuple[dict, dict | None, dict]:
    """``(model state_dict, ema state_dict or None, state)`` from a checkpoint folder."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a vitkit checkpoint folder (no {STATE_FILE})")
    weights = read_state_dict(folder / MODEL_FILE)
    ema = read_state_dict(folder / EMA_FILE) if (folder / EMA_FILE).is_file() else None
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"checkpoint state {str(folder / STATE_FILE)!r} could not be read: {e}") from None
    return weights, ema, state
