"""Reading and writing checkpoints, safely.

* ``.safetensors`` files are read with safetensors (no code can run).
* ``.pth``/``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)``: a pickle that would
  import or call anything is refused, and nothing in it is executed.
* ``{"state_dict": ...}`` and ``{"model": ...}`` wrappers (timm and vitkit training checkpoints) are
  unwrapped; a ``module.`` prefix from DataParallel/DDP is stripped. A checkpoint written by timm's
  ``train.py`` also pickles its ``argparse.Namespace`` of arguments: that one class is allow-listed for the
  weights-only unpickler (it only holds attribute values), everything else stays refused.
* Every value must be a tensor; anything else is an error that names the keys.
* A folder is resolved to the checkpoint inside it: a vitkit run folder's best checkpoint (else its last),
  or a folder holding ``model.safetensors``; otherwise the error lists the checkpoint files found.
* A checkpoint that does not fit the model is summarised (the model the file names, the first mismatched
  keys with their shapes, and the registered models whose parameter shapes do fit), not listed whole.
* Writes go to a temporary file in the same folder and are renamed into place, so an interrupted
  save never leaves a half-written file where a good checkpoint was.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit._io import atomic_write
from vitkit.models._registry import _REGISTRY, get_model_entry, split_model_name

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pth.tar")
# a training checkpoint folder (vitkit.train.state writes it): weights, EMA weights, optimizer/loop state
STATE_FILE, MODEL_FILE, EMA_FILE = "state.pt", "model.safetensors", "ema.safetensors"
# classes a training checkpoint pickles beside its tensors that hold nothing but values (timm's train.py: args)
SAFE_CLASSES = (argparse.Namespace,)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def clean_message(text: str) -> str:
    """An exception message without terminal escape codes (torch bolds parts of its unpickling errors)."""
    return _ANSI.sub("", text)


def find_checkpoint(ckpt_root: Path, name: str = "last") -> Path | None:
    """The complete checkpoint folder ``name`` (or its predecessor if a crash hit mid-replace), else None."""
    for cand in (ckpt_root / name, ckpt_root / f".{name}.old"):
        if (cand / STATE_FILE).is_file() and (cand / MODEL_FILE).is_file():
            return cand
    return None


def resolve_checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file ``path`` stands for: the file itself, or the weights inside a folder.

    A folder holding ``model.safetensors`` (a checkpoint folder) gives that file; a vitkit run folder gives its
    best complete checkpoint, else its last (the same choice as ``vitkit eval RUN``). Any other folder is an error
    naming the checkpoint files it holds.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    ckpt = find_checkpoint(path / "checkpoints", "best") or find_checkpoint(path / "checkpoints", "last")
    if ckpt is not None:
        return ckpt / MODEL_FILE
    suffixes = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
    found = sorted(f for pattern in ("*", "*/*") for f in path.glob(pattern) if f.name.endswith(suffixes))
    found = [str(f) for f in found if f.is_file()]
    if not found:
        hint = f"it holds no checkpoint file ({', '.join(suffixes)}) and is not a vitkit run folder"
    else:
        hint = "pass one of its files: " + ", ".join(_first([repr(f) for f in found], "", 5))
    raise IsADirectoryError(f"checkpoint {str(path)!r} is a folder, not a file; {hint}")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a checkpoint file (or a folder, see :func:`resolve_checkpoint_file`) without
    executing any code in it."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str | None]:
    """``(state dict, the model name the file records or None)``; see :func:`read_state_dict`.

    The name comes from vitkit's ``vitkit.model`` safetensors metadata or a timm training checkpoint's
    ``arch`` / ``args.model``.
    """
    path = resolve_checkpoint_file(path)
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {str(path)!r} is empty (0 bytes)")
    if path.name.endswith(SAFETENSORS_SUFFIXES):
        obj, stored = _read_safetensors(path)
    else:
        obj = _read_pickle(path)
        stored = _stored_name(obj)
    return _unwrap(obj, path), stored


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # one open: tensors and metadata
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta.get("vitkit.model") or None
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}")


def _allow_safe_classes():
    """The weights-only unpickler with :data:`SAFE_CLASSES` allow-listed (torch >= 2.5; older: nothing added)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals(list(SAFE_CLASSES)) if safe_globals is not None else contextlib.nullcontext()


def _refusal_reason(e: Exception) -> str:
    """The unpickler's own reason (e.g. ``Unsupported global: GLOBAL pkg.Class ...``), without torch's boilerplate
    around it: its advice to load with ``weights_only=False``, numbered options, the documentation link. Torch
    words the message differently by version and by what was refused."""
    text = clean_message(str(e)).strip()
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
        return reason.split(" Please use ", 1)[0].strip()
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(boilerplate):
            return line
    return type(e).__name__


def _read_pickle(path: Path) -> Any:
    try:
        with _allow_safe_classes():
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True refused a global or a call: the file holds more than tensors
        raise ValueError(
            f"checkpoint {str(path)!r} was refused: it contains pickled objects other than tensors and "
            f"plain containers, which vitkit never executes ({_refusal_reason(e)}). Re-save its state_dict, or "
            f"convert it to .safetensors."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, TypeError, ValueError, AttributeError) as e:
        # a crafted file can also make an allow-listed class raise while it is rebuilt (nothing is executed)
        msg = clean_message(str(e)).strip()
        raise ValueError(f"checkpoint {str(path)!r} could not be read (truncated or corrupt?): {msg}") from None


def _stored_name(obj: Any) -> str | None:
    """The architecture a training checkpoint names: timm's ``arch`` (its ``args.model``) or vitkit's."""
    if not isinstance(obj, dict):
        return None
    args = obj.get("args")
    for name in (getattr(args, "model", None), obj.get("arch")):
        if isinstance(name, str) and name:
            return name
    return None


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
        path: checkpoint file, or a folder holding one (see :func:`resolve_checkpoint_file`).
        checkpoint_filter: the family's ``(state_dict, model) -> state_dict`` converter.
        drop_classifier: True leaves the classifier freshly initialised; None does so only where the
            checkpoint's classifier does not fit the model (fine-tuning to another label set) or the checkpoint
            has none (headless or self-supervised weights); False treats a misfit like any other mismatch.

    Raises:
        RuntimeError: summarising missing and unexpected keys and mismatched shapes.
    """
    path = resolve_checkpoint_file(path)
    sd, stored = read_checkpoint(path)
    load_state_dict_into(model, sd, checkpoint_filter, drop_classifier, source=repr(str(path)), stored_name=stored)


def load_state_dict_into(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    checkpoint_filter=None,
    drop_classifier: bool | None = False,
    source: str = "state dict",
    stored_name: str | None = None,
) -> None:
    """Load an in-memory state dict; see :func:`load_checkpoint`. ``stored_name`` is the model the checkpoint
    says it holds, quoted when it does not fit."""
    name = getattr(model, "model_name", "") or type(model).__name__
    raw = sd
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
        # a checkpoint without a classifier (headless weights, a self-supervised backbone) leaves the model's fresh
        misfit = not ckpt_head or any(k not in own or own[k].shape != sd[k].shape for k in ckpt_head)
        if drop_classifier or misfit:
            sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
            skip_missing = {k for k in own if k.startswith(prefix)}
    wrong_shape = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and k not in skip_missing]
    unexpected = [k for k in sd if k not in own]
    if wrong_shape or missing or unexpected:
        lines = [f"{name}: cannot load {source}: it does not fit this model"]
        if stored_name and stored_name != name:
            lines.append(f"the checkpoint was saved from {stored_name!r}")
        if wrong_shape:
            lines.append(f"{len(wrong_shape)} of {len(sd)} tensors have other shapes:")
            shown = [f"  {k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong_shape]
            lines += _first(shown, "  ...")
        if missing:
            lines.append(f"missing keys ({len(missing)}): " + ", ".join(_first(missing)))
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(_first(unexpected)))
        head = classifier + "." if classifier else None
        only_head = head is not None and all(k.startswith(head) for k in wrong_shape + missing + unexpected)
        if only_head and f"{head}weight" in sd:  # the body fits: the checkpoint was fine-tuned to other classes
            n = sd[f"{head}weight"].shape[0]
            lines.append(
                f"only the classifier differs: the checkpoint has {n} classes; pass num_classes={n} to load it "
                f"whole, or the number of classes you want to fine-tune it to a new classifier"
            )
        else:
            lines.append(_fitting_models_hint(raw, model, stored_name))
        raise RuntimeError("\n  ".join(lines))
    model.load_state_dict(sd, strict=False)


def _first(items: list[str], more: str = "", n: int = 5) -> list[str]:
    """The first ``n`` items, and how many were left out."""
    if len(items) <= n:
        return items
    return items[:n] + [f"{more} and {len(items) - n} more".strip()]


# ---- which registered model a checkpoint fits ----------------------------------------------------------------
# Candidates are built on the meta device (no memory, no initialisation cost) and compared by parameter shapes
# after their family's checkpoint filter. Only families whose key names (digits masked) overlap the checkpoint's
# are searched member by member, so a mismatch report costs a few dozen meta builds at most.

_META_MODELS: dict[str, nn.Module | None] = {}


def _meta_model(name: str) -> nn.Module | None:
    if name not in _META_MODELS:
        from vitkit.models._builder import create_model  # the builder imports this module

        try:
            with torch.device("meta"):
                _META_MODELS[name] = create_model(name)
        except Exception:  # noqa: BLE001 - a model that cannot be built on meta is just not a candidate
            _META_MODELS[name] = None
    return _META_MODELS[name]


def _shapes_without_head(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape, leaving out the classifier (any size fits) and the first conv's input channels (adapted)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    head = (cfg.get("classifier") or "\0") + "."
    first = f"{cfg.get('first_conv')}.weight"
    out = {}
    for k, v in sd.items():
        if not k.startswith(head):
            shape = tuple(v.shape)
            out[k] = shape[:1] + shape[2:] if k == first and len(shape) == 4 else shape
    return out


def _fits(raw: dict[str, torch.Tensor], name: str) -> tuple[bool, float]:
    """Whether ``raw`` fits registered model ``name`` exactly (classifier aside), and the fraction of its key
    names, digits masked, that the model has too (0 when the model or its filter cannot take it)."""
    model = _meta_model(name)
    if model is None:
        return False, 0.0
    entry_filter = get_model_entry(name).checkpoint_filter
    try:
        sd = entry_filter(dict(raw), model) if entry_filter is not None else raw
    except Exception:  # noqa: BLE001 - a filter for another family may not understand these keys
        return False, 0.0
    ours, theirs = _shapes_without_head(sd, model), _shapes_without_head(model.state_dict(), model)
    names = {re.sub(r"\d+", "#", k) for k in ours}
    shared = len(names & {re.sub(r"\d+", "#", k) for k in theirs}) / max(len(names), 1)
    return ours == theirs, shared


def fitting_models(raw: dict[str, torch.Tensor], task: str = "classification", first: str | None = None) -> list[str]:
    """Registered models (of ``task``) whose parameter shapes the checkpoint ``raw`` fits, classifier aside.

    ``first`` (e.g. the name the file records) is tried first and listed first when it fits.
    """
    families: dict[str, list[str]] = {}
    for n, e in _REGISTRY.items():
        if e.default_cfg.get("task", "classification") == task:
            families.setdefault(e.family, []).append(n)
    first = split_model_name(first)[0] if first else None
    found = [first] if first in _REGISTRY and _fits(raw, first)[0] else []
    for members in families.values():
        # a family whose key names (a representative's, after its filter) are mostly not the checkpoint's
        # cannot hold it: its other members are not built
        rep_fits, shared = _fits(raw, members[0])
        if not rep_fits and shared < 0.5:
            continue
        found += [n for n in members if n != first and (rep_fits if n == members[0] else _fits(raw, n)[0])]
    return found


def _fitting_models_hint(raw: dict[str, torch.Tensor], model: nn.Module, stored_name: str | None) -> str:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    found = fitting_models(raw, cfg.get("task", "classification"), stored_name)
    if not found:
        return "no registered model has these parameter shapes (other architecture arguments, or another library's?)"
    names = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    return f"registered models with these parameter shapes: {names} (create_model({found[0]!r}, checkpoint_path=...))"
