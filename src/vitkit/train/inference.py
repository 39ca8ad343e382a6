"""A trained run (or any checkpoint folder) loaded back for evaluation and prediction, for any task.

The run's ``config.yaml`` is the truth: it names the task, the model and its arguments, and what the dataset
decided (classes, channels), so the model is rebuilt without the training data. Prediction reuses the task's
eval transform, the same one training's evaluation uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vitkit.config import TrainConfig
from vitkit.data.images import IMG_EXTENSIONS, ImageDecodeError, load_image
from vitkit.models._checkpoint import EMA_FILE, MODEL_FILE, load_state_dict_into, read_state_dict
from vitkit.tasks import Task, build_task
from vitkit.train.rundir import locate, read_run_config


@dataclass
class LoadedRun:
    model: nn.Module
    task: Task
    cfg: TrainConfig
    data_config: dict
    checkpoint: Path
    run_dir: Path


def load_run(path: str | Path, which: str = "best", ema: bool = False, compile: bool = False) -> LoadedRun:
    """A run's model with its ``which`` checkpoint's weights (``ema=True``: the EMA weights), in eval mode.

    ``compile``: the model through :func:`vitkit.optimize` (``torch.compile`` with freezing, checked against eager
    on an input of the run's data config before it is used; an error if it differs), at a static or a symbolic batch
    size, whichever is faster.
    """
    run_dir, ckpt = locate(path, which)
    cfg = read_run_config(run_dir, ckpt)
    task = build_task(cfg)
    model = task.build_model(initial_weights=False)
    weights = ckpt / (EMA_FILE if ema else MODEL_FILE)
    if not weights.is_file():
        raise FileNotFoundError(f"{str(weights)!r} not found" + (" (the run kept no EMA weights)" if ema else ""))
    load_state_dict_into(model, read_state_dict(weights))
    data_config = task.data_config(model)
    if compile:
        from vitkit.routes import optimize

        example = torch.randn(2, *data_config["input_size"], generator=torch.Generator().manual_seed(0))
        # the static form and the symbolic-batch one (one program for the run's batch sizes, where the family
        # captures it in one graph), the faster kept
        model = optimize(model, example, route="compile")
    return LoadedRun(model.eval(), task, cfg, data_config, weights, run_dir)


def calibration_batches(run: LoadedRun, n: int, batch_size: int = 32, start: int = 0) -> list[torch.Tensor]:
    """Images ``start .. start + n`` of the run's training split through its eval transform, in batches: what a
    post-training quantizer calibrates on (real inputs, preprocessed exactly as at inference)."""
    from torch.utils.data import Subset

    from vitkit.data.loader import TransformView, collate_skip, eval_plan
    from vitkit.train.evaluate import batches

    data = run.task.dataset(run.cfg.data.train_split)
    if start + n > len(data):
        raise ValueError(f"calibration asks for images {start}..{start + n} of a training split of {len(data)}")
    view = TransformView(Subset(data, range(start, start + n)), run.task.eval_transform(run.data_config), 0, joint=True)
    plan = eval_plan(n, batch_size, tuple(run.data_config["input_size"][1:]))
    return [x for x, _, _ in batches(view, plan, collate_skip, torch.device("cpu"))]


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
def predict(run: LoadedRun, paths: list[str], batch_size: int = 64, **options) -> list[dict]:
    """The task's outputs for each image (``{"image": path, ...}``); undecodable files get an ``error`` entry."""
    tf = run.task.eval_transform(run.data_config)
    files, results = image_files(paths), []
    for i in range(0, len(files), batch_size):
        good, xs, metas = [], [], []
        for f in files[i : i + batch_size]:
            try:
                x, meta = tf(load_image(f), None, None, None)  # (image, target, rng, size)
                good.append(f)
                xs.append(x)
                metas.append(meta)
            except (ImageDecodeError, OSError, ValueError) as e:
                results.append({"image": str(f), "error": str(e)})
        if xs:
            outs = run.task.predict_batch(run.model, torch.stack(xs), metas, **options)
            results += [{"image": str(f), **o} for f, o in zip(good, outs)]
    return results
