"""Load a trained run (or any checkpoint) for evaluation and prediction."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import vitkit
from vitkit.data.datasets import IMG_EXTENSIONS, load_image
from vitkit.data.transforms import EvalTransform
from vitkit.models._checkpoint import load_state_dict_into, read_state_dict
from vitkit.train.state import EMA_FILE, MODEL_FILE, find_checkpoint


def locate(path: str | Path, which: str = "best") -> tuple[Path, Path]:
    """``(run folder, checkpoint folder)`` from a run folder or a checkpoint folder."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path.parent.parent, path
    ckpt = find_checkpoint(path / "checkpoints", which) or find_checkpoint(path / "checkpoints", "last")
    if ckpt is None:
        raise FileNotFoundError(f"{str(path)!r} is neither a vitkit run folder nor a checkpoint folder")
    return path, ckpt


def load_run(path: str | Path, which: str = "best", ema: bool = False) -> tuple[nn.Module, dict]:
    """A model with a run's weights (``ema=True``: its EMA weights) and the run's info (classes, data config)."""
    run_dir, ckpt = locate(path, which)
    info_file = run_dir / "run.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{str(info_file)!r} is missing: cannot tell which model {ckpt} belongs to")
    info = json.loads(info_file.read_text())
    kwargs = dict(info.get("model_kwargs") or {})
    kwargs["in_chans"] = info["data_config"]["input_size"][0]
    size = tuple(info["data_config"]["input_size"][1:])
    model = vitkit.create_model(info["model"], num_classes=info["num_classes"], img_size=size, **kwargs)
    weights = ckpt / (EMA_FILE if ema else MODEL_FILE)
    if not weights.is_file():
        raise FileNotFoundError(f"{str(weights)!r} not found" + (" (the run kept no EMA weights)" if ema else ""))
    load_state_dict_into(model, read_state_dict(weights))
    info["checkpoint"], info["run_dir"] = str(weights), str(run_dir)
    return model.eval(), info


def image_files(paths: list[str]) -> list[Path]:
    """Expand folders (recursively) into image files; a path that does not exist is an error."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"image or folder {str(p)!r} does not exist")
    if not files:
        raise ValueError(f"no images found in {paths}")
    return files


@torch.no_grad()
def predict(model: nn.Module, info: dict, paths: list[str], topk: int = 5, batch_size: int = 64) -> list[dict]:
    """Top-k classes with probabilities for each image; undecodable files get an 'error' entry."""
    tf, classes = EvalTransform.from_data_config(info["data_config"]), info["classes"]
    files, results = image_files(paths), []
    k = min(topk, len(classes))
    for i in range(0, len(files), batch_size):
        batch, xs = files[i : i + batch_size], []
        for f in batch:
            try:
                xs.append((f, tf(load_image(f))))
            except Exception as e:  # noqa: BLE001 - report and continue
                results.append({"image": str(f), "error": str(e)})
        if not xs:
            continue
        probs = model(torch.stack([x for _, x in xs])).float().softmax(-1)
        p, idx = probs.topk(k, dim=-1)
        for (f, _), pi, ii in zip(xs, p.tolist(), idx.tolist()):
            results.append(
                {"image": str(f), "top": [{"class": classes[c], "index": c, "prob": q} for q, c in zip(pi, ii)]}
            )
    return results
