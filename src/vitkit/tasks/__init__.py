"""Tasks: what differs between classification, detection, segmentation, generation and self-supervision.

One folder per task (``classification/``, ``detection/``, ``segmentation/``, ``masked_patch/`` ...) holds its
:class:`Task` subclass and its heads, losses, data pieces and metrics. The loop in :mod:`vitkit.train` is the
same for all of them. :func:`build_task` picks the task for a config: ``task.name`` when set (a registered name
or a ``package.module:Class`` path), else the one the model declares (a detector implies detection), and
checks that the model and the dataset belong to it.
"""

from __future__ import annotations

import importlib

from vitkit.config import TrainConfig
from vitkit.models import get_model_entry
from vitkit.tasks.base import EvalContext, Task
from vitkit.tasks.classification import ClassificationTask
from vitkit.tasks.detection.task import DetectionTask
from vitkit.tasks.generation import GanTask
from vitkit.tasks.masked_patch import MaskedPatchTask
from vitkit.tasks.segmentation import SegmentationTask

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Make ``cls`` available as ``task.name = cls.name`` (usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"task class {cls.__qualname__} has no name")
    TASKS[cls.name] = cls
    return cls


register_task(ClassificationTask)
register_task(SegmentationTask)
register_task(DetectionTask)
register_task(MaskedPatchTask)
register_task(GanTask)


def task_class(name: str) -> type[Task]:
    """A registered task by name, or a :class:`Task` subclass by ``package.module:Class`` path."""
    if name in TASKS:
        return TASKS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"task {name!r} could not be imported: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ValueError(f"task {name!r} is not a vitkit.tasks.Task subclass")
        return cls
    raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)} (or a 'package.module:Class' path)")


def model_task(model_name: str) -> str:
    """The task a registered model is built for (its registry config's ``task``; classification by default)."""
    return get_model_entry(model_name).default_cfg.get("task", "classification")


def build_task(cfg: TrainConfig) -> Task:
    """The task of a run, checked against the model and the dataset (errors name both)."""
    own = model_task(cfg.model.name)
    cls = task_class(cfg.task.name or own)
    accepted = cls.model_tasks or (cls.name,)
    if own not in accepted:
        raise ValueError(
            f"model {cfg.model.name!r} is a {own} model, but the run's task is {cls.name!r} "
            f"(it trains {', '.join(accepted)} models)"
        )
    dataset = cfg.data.dataset.lower().replace("-", "_")
    if cls.datasets and dataset not in cls.datasets:
        owners = [t.name for t in TASKS.values() if dataset in t.datasets]
        kind = f"a {owners[0]} dataset" if owners else "not a dataset any task knows"
        raise ValueError(
            f"dataset {cfg.data.dataset!r} is {kind}, but model {cfg.model.name!r} is trained for {cls.name!r} "
            f"(datasets: {', '.join(cls.datasets)})"
        )
    return cls(cfg)


__all__ = [
    "TASKS",
    "ClassificationTask",
    "DetectionTask",
    "EvalContext",
    "GanTask",
    "MaskedPatchTask",
    "SegmentationTask",
    "Task",
    "build_task",
    "model_task",
    "register_task",
]
