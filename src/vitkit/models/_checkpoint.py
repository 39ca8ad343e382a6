"""Reading and writing checkpoints, safely.

* ``.safetensors`` files are read with safetensors (no code can run).
* ``.pth``/``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)``: a pickle that would
  import or call anything is refused, and nothing in it is executed.
* ``{"state_dict": ...}`` and ``{"model": ...}`` wrappers (timm and vitkit training checkpoints) are
  unwrapped; a ``module.`` prefix from DataParallel/DDP is stripped.
* Every value must be a tensor; anything else is an error that names the keys.
* Writes go to a temporary file in the same folder and are renamed into place, so an interrupted
  save never leaves a half-written file where a good checkpoint was.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit._io import atomic_write

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a checkpoint file without executing any code in it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {str(path)!r} is empty (0 bytes)")
    if path.name.endswith(SAFETENSORS_SUFFIXES):
        obj = _read_safetensors(path)
    else:
        obj = _read_pickle(path)
    return _unwrap(obj, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}")


def _read_pickle(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True refused a global or a call: the file holds more than tensors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"checkpoint {str(path)!r} was refused: it contains pickled objects other than tensors and "
            f"plain containers, which vitkit never executes ({first}). Re-save its state_dict, or convert it "
            f"to .safetensors."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"checkpoint {str(path)!r} could not be read (truncated or corrupt?): {e}") from None


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict of tensors")
    bad = {k: type(v).__name__ for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if bad:
        shown = ", ".join(f"{k!r} ({t})" for k, t in list(bad.items())[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise ValueError(f"checkpoint {str(path)!r} is not a state dict: non-tensor values at {shown}{more}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def save_state_dict(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save a model's weights to ``path`` (.safetensors, or a weights-only torch file otherwise)."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    name = getattr(model, "model_name", "") or type(model).__name__
    if str(path).endswith(SAFETENSORS_SUFFIXES):
        from safetensors.torch import save_file

        return atomic_write(path, lambda p: save_file(sd, p, metadata={"format": "pt", "vitkit.model": name}))
    return atomic_write(path, lambda p: torch.save(sd, p))


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-conv weight trained on 3 channels to ``in_chans`` channels (as timm does).

    One channel: the sum over RGB. Other counts: RGB repeated and rescaled by 3 / in_chans.
    """
    c = weight.shape[1]
    if c == in_chans:
        return weight
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_chans // c)
        w = w.repeat(1, reps, 1, 1)[:, :in_chans] * (c / in_chans)
    return w.to(weight.dtype)


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    checkpoint_filter=None,
    drop_classifier: bool | None = False,
) -> None:
    """Load a checkpoint file into ``model``, converting reference-format keys where needed.

    Args:
        model: the vitkit model (its ``pretrained_cfg`` names the first conv and the classifier).
        path: checkpoint file.
        checkpoint_filter: the family's ``(state_dict, model) -> state_dict`` converter.
        drop_classifier: True leaves the classifier freshly initialised; None does so only where the
            checkpoint's classifier does not fit the model (fine-tuning to another label set); False
            treats a misfit like any other mismatch.

    Raises:
        RuntimeError: listing missing and unexpected keys, or mismatched shapes.
    """
    sd = read_state_dict(path)
    load_state_dict_into(model, sd, checkpoint_filter, drop_classifier, source=repr(str(path)))


def load_state_dict_into(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    checkpoint_filter=None,
    drop_classifier: bool | None = False,
    source: str = "state dict",
) -> None:
    """Load an in-memory state dict; see :func:`load_checkpoint`."""
    name = getattr(model, "model_name", "") or type(model).__name__
    if checkpoint_filter is not None:
        sd = checkpoint_filter(dict(sd), model)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    own = model.state_dict()
    first = cfg.get("first_conv")
    key = f"{first}.weight" if first else None
    if key in sd and key in own and sd[key].ndim == 4 and sd[key].shape[1] != own[key].shape[1]:
        sd[key] = adapt_input_conv(sd[key], own[key].shape[1])
    classifier = cfg.get("classifier")
    skip_missing: set[str] = set()
    if classifier and drop_classifier is not False:
        prefix = classifier + "."
        ckpt_head = [k for k in sd if k.startswith(prefix)]
        misfit = any(k not in own or own[k].shape != sd[k].shape for k in ckpt_head)
        if drop_classifier or misfit:
            sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
            skip_missing = {k for k in own if k.startswith(prefix)}
    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and own[k].shape != v.shape
    ]
    if wrong_shape:
        raise RuntimeError(f"{name}: cannot load {source}: shape mismatch for\n  " + "\n  ".join(wrong_shape))
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if k not in skip_missing]
    if missing or result.unexpected_keys:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
        if result.unexpected_keys:
            lines.append(f"unexpected keys ({len(result.unexpected_keys)}): " + ", ".join(result.unexpected_keys))
        raise RuntimeError(f"{name}: cannot load {source}:\n  " + "\n  ".join(lines))
