"""The Task interface: everything that differs between classification, detection, segmentation, ... .

The training loop (:mod:`vitkit.train`) owns what every task shares: optimizer, schedule, accumulation, AMP,
EMA, clipping, non-finite handling, checkpoints and exact resume, DDP, records and progress. A :class:`Task`
owns the rest, built from the run's config:

* **data**: :meth:`dataset` for a split, :meth:`resolve` (what the dataset decides, written into the config),
  :meth:`train_transform` / :meth:`eval_transform` (``(image, target, rng, size) -> (input, target)``), and
  :meth:`collate` (samples -> ``(inputs, targets, failures)``);
* **training**: :meth:`prepare` (batch-level augmentation such as mixup) and :meth:`losses` (a dict of named
  loss terms whose sum is minimised); :meth:`optim_phases` (a step in several phases, each with its own optimizer,
  such as a GAN's discriminator and generator steps; one phase by default) and :meth:`after_step` (periodic work
  after an optimizer step, such as sample grids);
* **evaluation**: :meth:`evaluate` (metrics from one pass over held-out batches, summed over DDP ranks),
  :meth:`write_eval` (``eval.json`` and figures) and :meth:`format_eval`; :meth:`features` (the frozen
  representation the few-shot linear probe reads);
* **prediction**: :meth:`predict_batch` (per-image outputs), :meth:`format_prediction` and
  :meth:`save_predictions`.

Class attributes say what the loop needs to know: ``score`` (the metric that picks the best checkpoint,
higher is better), ``metrics`` (scalars logged per epoch), ``datasets`` (dataset names the task reads, for the
model/dataset check) and ``Options`` (a dataclass of the task's own ``task.<key>`` config options).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitkit.config import TrainConfig, check_range, coerce_value
from vitkit.data.loader import collate_skip
from vitkit.models import create_model, resolve_data_config
from vitkit.runtime import DistInfo, autocast


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a training step: the module whose parameters its optimizer steps, and its learning rate as a
    multiple of the schedule's."""

    module: nn.Module
    lr_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """Where and how evaluation runs: the device, AMP mode, the DDP group whose counts are summed, and the dataset
    being evaluated (for metrics that need its annotations whole, such as COCO's)."""

    device: torch.device = torch.device("cpu")
    amp: str = "none"
    dist: DistInfo = dataclasses.field(default_factory=DistInfo)
    dataset: Any = None

    def autocast(self):
        return autocast(self.device, self.amp)


class Task:
    """Base class of every task; subclasses set the class attributes and implement the data/loss/metric parts."""

    name: str = ""
    score: str = ""  # metric that picks the best checkpoint (higher is better)
    score_label: str = ""  # how the score is printed, e.g. "top-1"
    metrics: tuple[str, ...] = ()  # scalar metrics logged per epoch as val_<m> / ema_<m>
    datasets: tuple[str, ...] = ()  # dataset names this task reads
    model_tasks: tuple[str, ...] = ()  # tasks of the registered models it trains (empty: models of its own name)

    @dataclasses.dataclass(frozen=True)
    class Options:
        """The task's own options (``task.<key>`` in a config); none by default."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.options = parse_options(self, cfg.task.options)

    # ---- data ---------------------------------------------------------------------------------------

    def dataset(self, split: str, download: bool = False):
        """The dataset of ``split`` (``data.train_split`` / ``data.val_split``) as the task reads it."""
        raise NotImplementedError

    def resolve(self, dataset) -> None:
        """Write what the training set decides into the config (the run's truth), failing on a contradiction.

        The base resolves the input channels: ``model.in_chans`` from the config, else the dataset's declared
        ``channels``, else 3 (images decoded per file are converted to it). A config and a dataset that disagree
        are an error naming both.
        """
        m, d = self.cfg.model, self.cfg.data
        if "in_chans" in m.kwargs:  # the older spelling model.kwargs.in_chans
            given = m.kwargs.pop("in_chans")
            if m.in_chans not in (None, given):
                raise ValueError(f"config: model.in_chans={m.in_chans} and model.kwargs.in_chans={given} disagree")
            m.in_chans = given
        channels = getattr(dataset, "channels", None)
        if m.in_chans is None:
            m.in_chans = channels or 3
        elif channels is not None and channels != m.in_chans:
            raise ValueError(
                f"config: model.in_chans={m.in_chans}, but dataset {d.dataset!r} holds {channels}-channel images; "
                f"leave model.in_chans unset to take the dataset's {channels}"
            )

    def resolve_classes(self, dataset, what: str = "classes") -> None:
        """``data.classes`` and ``model.num_classes`` from the dataset's ``classes``, or an error naming both when
        the config already says otherwise (the classification, segmentation and detection tasks use this)."""
        m, d = self.cfg.model, self.cfg.data
        names = [str(c) for c in dataset.classes]
        if d.classes is not None and [str(c) for c in d.classes] != names:
            raise ValueError(f"config: data.classes {d.classes} differ from dataset {d.dataset!r}'s {what} {names}")
        if m.num_classes is not None and m.num_classes != len(names):
            raise ValueError(
                f"config: model.num_classes={m.num_classes}, but dataset {d.dataset!r} has {len(names)} {what}"
            )
        d.classes, m.num_classes = names, len(names)

    @property
    def classes(self) -> list[str]:
        """The class names (resolved into ``data.classes``)."""
        return list(self.cfg.data.classes or [])

    def build_model(self, initial_weights: bool = True) -> nn.Module:
        """The configured model; ``initial_weights=False`` skips ``model.pretrained`` / ``model.checkpoint``
        (a run's own checkpoint is loaded instead)."""
        m = self.cfg.model
        extra = {"num_classes": m.num_classes} if m.num_classes is not None else {}
        return create_model(
            m.name,
            pretrained=m.pretrained and initial_weights,
            checkpoint_path=m.checkpoint if initial_weights else None,
            in_chans=m.in_chans if m.in_chans is not None else 3,
            img_size=m.img_size,
            drop_path_rate=m.drop_path_rate,
            **extra,
            **m.kwargs,
        )

    def data_config(self, model: nn.Module) -> dict:
        """The model's data config with the run's overrides (``data.mean`` / ``data.std``, canvas evaluation)."""
        dc = resolve_data_config(model)
        d = self.cfg.data
        return dict(dc, mean=list(d.mean or dc["mean"]), std=list(d.std or dc["std"]), eval_canvas=False)

    def train_transform(self, data_config: dict):
        raise NotImplementedError

    def eval_transform(self, data_config: dict):
        raise NotImplementedError

    collate = staticmethod(collate_skip)

    # ---- training -----------------------------------------------------------------------------------

    def prepare(self, inputs: torch.Tensor, targets, rng: np.random.Generator):
        """Batch-level augmentation before the forward (mixup/cutmix for classification); identity by default."""
        return inputs, targets

    def losses(self, model: nn.Module, inputs: torch.Tensor, targets) -> dict[str, torch.Tensor]:
        """Named loss terms for one batch (the loop minimises their sum). A task with :meth:`optim_phases` also
        takes ``phase=<name>``: the terms that phase's optimizer minimises."""
        raise NotImplementedError

    def optim_phases(self, model: nn.Module) -> dict[str, Phase] | None:
        """The phases of a training step in the order they run, each stepping its own parameters with its own
        optimizer on the same micro-batches (names must be unique across phases' loss terms); None (the default):
        one optimizer over the whole model."""
        return None

    def after_step(self, model: nn.Module, ema: nn.Module | None, step: int, run_dir: Path) -> None:
        """Called on the main process after every optimizer step (``step`` counts from 1), e.g. to write sample
        images into the run folder. It must not draw from the global random generators (exact resume)."""

    def example_targets(self, inputs: torch.Tensor):
        """Valid targets for a batch of ``inputs`` (for timing the training step without a dataset)."""
        raise NotImplementedError

    # ---- evaluation ---------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, batches: Iterable, ctx: EvalContext) -> dict:
        """Metrics from one pass over ``(inputs, targets, failures)`` batches (already on ``ctx.device``); every
        rank returns the global numbers. Must hold ``score`` and ``metrics``."""
        raise NotImplementedError

    @staticmethod
    def forward_eval(model: nn.Module, batches: Iterable, ctx: EvalContext, tally: dict) -> Iterable:
        """``(targets, outputs)`` for each batch that has images, the forward under ``ctx``'s autocast;
        ``tally["failed"]`` counts the images that could not be read."""
        for x, y, failed in batches:
            tally["failed"] = tally.get("failed", 0) + len(failed)
            if x is None:
                continue
            with ctx.autocast():
                out = model(x)
            yield y, out

    def features(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The frozen image representation ``(B, D)`` that the few-shot linear probe reads: the model's pooled
        features before its classifier (``forward_head(..., pre_logits=True)``)."""
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            name = getattr(model, "model_name", type(model).__name__)
            raise ValueError(f"task {self.name!r}: model {name!r} gives no pooled image features for a linear probe")
        return model.forward_head(model.forward_features(inputs), pre_logits=True)

    def write_eval(self, results: dict, folder: Path, title: str) -> list[Path]:
        """``eval.json`` (and any figures) in ``folder``; returns the files written."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "eval.json"
        path.write_text(json.dumps(results, indent=2, default=float))
        return [path]

    def format_eval(self, results: dict) -> str:
        return "  ".join(f"{m} {results[m]:.4f}" for m in self.metrics if m in results)

    # ---- prediction ---------------------------------------------------------------------------------

    def predict_batch(self, model: nn.Module, inputs: torch.Tensor, metas: list, **options) -> list[dict]:
        """One output dict per image of ``inputs`` (the eval transform's tensors; ``metas`` its second outputs, e.g.
        the resize scale). Keys starting with ``_`` (arrays for :meth:`save_predictions`) are not printed."""
        raise NotImplementedError

    def format_prediction(self, result: dict) -> str:
        return json.dumps({k: v for k, v in result.items() if k != "image"})

    def save_predictions(self, results: list[dict], folder: Path) -> list[Path]:
        """``predictions.json`` in ``folder`` (tasks with pictures to draw add them)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "predictions.json"
        path.write_text(json.dumps(results, indent=2))
        return [path]


def parse_options(task: Task, given: dict[str, Any]) -> Any:
    """``task.<key>`` values checked against the task's ``Options`` dataclass (types and ranges), naming the key."""
    cls = type(task).Options
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in given.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ValueError(f"config: unknown key task.{key} for task {task.name!r}; its options: {known}")
        values[key] = coerce_value(value, hints[key], f"task.{key}")
        check_range(values[key], fields[key].metadata.get("range"), f"task.{key}")
    return cls(**values)
