"""Training configuration: one dataclass per section, loaded from YAML, overridden with ``--set a.b=value``.

Every key is validated where it is parsed: an unknown section or key, a value of the wrong type or outside its
range is an error that names it (``--set optim.lrr=1e-3`` and ``--set optim.lr=-1`` fail rather than reaching
torch). ``model.kwargs`` is passed to ``create_model`` (which rejects arguments the family does not take);
``task.<key>`` holds the chosen task's own options, validated by that task (``vitkit.tasks``).

The defaults are the embedded run (``vitkit train`` with no arguments): a two-level NesT (0.4M params) on
scikit-learn's bundled 8x8 digits upsampled to 16x16, 30 epochs, about a minute and a half on 2 CPU cores.
Its architecture overrides (``DEFAULT_MODEL``) belong to its model: a config that names any ``model.name``
starts from a blank model section instead, wherever in the file or the overrides the name appears, so the
result never depends on the order of the keys.

A written ``config.yaml`` is a run's truth: what the dataset decided (``model.num_classes``, ``model.in_chans``,
``data.classes``) is resolved into it when the run starts, so evaluation and prediction rebuild the model from
the config alone.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def value_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> dict:
    """Field metadata: the value must lie in ``[lo, hi]`` (``lo_open``/``hi_open``: excluding that end)."""
    return {"range": (lo, hi, lo_open, hi_open)}


# the embedded run's model: NesT-T/CIFAR made a 2-level, width-96 model at 16x16 (see the module docstring)
DEFAULT_MODEL = dict(
    name="nest_tiny_cifar",
    kwargs=dict(patch_size=2, num_levels=2, embed_dims=[96, 96], num_heads=[3, 3], depths=[2, 2]),
    img_size=16,
)


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL["name"]
    kwargs: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_MODEL["kwargs"]))  # create_model arguments
    img_size: int | None = field(default=DEFAULT_MODEL["img_size"], metadata=value_range(1))  # None: the model's own
    num_classes: int | None = field(default=None, metadata=value_range(1))  # None: from the dataset (resolved)
    in_chans: int | None = field(default=None, metadata=value_range(1))  # None: from the dataset (resolved)
    pretrained: bool = False
    checkpoint: str | None = None  # initial weights (fine-tuning); not for resuming
    drop_path_rate: float = field(default=0.0, metadata=value_range(0, 1, hi_open=True))


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits | mnist | fashion_mnist | cifar10 | cifar100 | imagefolder
    root: str | None = None
    train_split: str = "train"  # TFDS-style slices: "test[:8000]", "train[:90%]"
    val_split: str | None = "test"  # None: no held-out evaluation
    download: bool = False
    batch_size: int = field(default=32, metadata=value_range(1))  # per process and micro-step (multi-scale: the base)
    eval_batch_size: int = field(default=256, metadata=value_range(1))
    num_workers: int = field(default=0, metadata=value_range(0))
    mean: list | None = None  # None: the model's data config
    std: list | None = None
    classes: list | None = None  # class names; None: the dataset's (resolved)
    multiscale: bool = False  # MobileViT's multi-scale sampler with variable batch size
    resolutions: list = field(default_factory=lambda: [160, 192, 256, 288, 320])
    max_bad_images: int = field(default=20, metadata=value_range(1))  # consecutive undecodable images before abort


@dataclass
class AugConfig:
    crop: str = "pad"  # rrc | pad | canvas | resize
    scale: list = field(default_factory=lambda: [0.08, 1.0])
    pad: int = field(default=2, metadata=value_range(0))
    hflip: float = field(default=0.0, metadata=value_range(0, 1))
    randaugment: str | None = None  # e.g. "rand-m9-mstd0.5"
    erasing: float = field(default=0.0, metadata=value_range(0, 1))
    mixup: float = field(default=0.0, metadata=value_range(0))  # Beta alpha; 0 disables
    cutmix: float = field(default=0.0, metadata=value_range(0))
    mix_prob: float = field(default=1.0, metadata=value_range(0, 1))
    switch_prob: float = field(default=0.5, metadata=value_range(0, 1))
    label_smoothing: float = field(default=0.0, metadata=value_range(0, 1, hi_open=True))


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = field(default=1e-3, metadata=value_range(0, lo_open=True))
    weight_decay: float = field(default=0.05, metadata=value_range(0))
    momentum: float = field(default=0.9, metadata=value_range(0, 1, hi_open=True))
    nesterov: bool = True
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = field(default=1e-8, metadata=value_range(0, lo_open=True))
    clip_grad: float | None = field(default=None, metadata=value_range(0, lo_open=True))  # max global grad norm
    accum_steps: int = field(default=1, metadata=value_range(1))


@dataclass
class ScheduleConfig:
    epochs: int = field(default=30, metadata=value_range(1))
    warmup_epochs: float = field(default=1.0, metadata=value_range(0))
    warmup_lr: float = field(default=1e-6, metadata=value_range(0))
    min_lr: float = field(default=1e-6, metadata=value_range(0))


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16 (fp16: CUDA only)
    channels_last: bool = False
    compile: bool = False
    ema_decay: float = field(default=0.99, metadata=value_range(0, 1, hi_open=True))  # 0 disables EMA weights
    extra_loss_weights: dict = field(default_factory=dict)  # model.extra_losses() terms, e.g. {dp: 1.0}
    output: str | None = None  # run folder; default runs/<model>-<dataset>[-N]
    checkpoint_every: int = field(default=0, metadata=value_range(0))  # steps between mid-epoch checkpoints (0: none)
    log_every: int = field(default=10, metadata=value_range(1))
    tensorboard: bool = False
    max_steps: int = field(default=0, metadata=value_range(0))  # stop after this many optimizer steps; 0: all epochs
    max_nonfinite: int = field(default=5, metadata=value_range(1))  # consecutive NaN/Inf losses before the run aborts
    threads: int = field(default=0, metadata=value_range(0))  # torch intra-op threads (0: leave torch's default)
    progress: bool = True


@dataclass
class TaskConfig:
    """``task.name`` picks the task (None: the model's own, e.g. a detector implies detection; or a
    ``package.module:Class`` path to a :class:`vitkit.tasks.Task` subclass); every other ``task.<key>`` is an
    option of that task, checked against its ``Options`` when the task is built."""

    name: str | None = None
    options: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["task"] = {"name": self.task.name, **self.task.options}  # task options flat: task.<key>
        return d

    @classmethod
    def from_dict(cls, d: dict | None, overrides: list[str] | None = None) -> TrainConfig:
        """The defaults, then the sections of ``d``, then ``section.key=value`` overrides (see :meth:`override`)."""
        d = dict(d or {})
        if isinstance(d.get("task"), str):  # "task: detection" is short for "task: {name: detection}"
            d["task"] = {"name": d["task"]}
        for section, values in d.items():
            if section not in _sections():
                raise ValueError(f"config: unknown section {section!r}; known: {', '.join(_sections())}")
            if not isinstance(values, dict):
                raise ValueError(f"config: section {section!r} must be a mapping, got {values!r}")
        pairs = [(f"{s}.{k}", v) for s, values in d.items() for k, v in values.items()] + _parse(overrides)
        cfg = cls()
        if any(key == "model.name" for key, _ in pairs):
            cfg.model = ModelConfig(name=cfg.model.name, kwargs={}, img_size=None)  # not the embedded run's model
        for key, value in pairs:
            cfg.set(key, value)
        return cfg

    def set(self, dotted: str, value: Any) -> None:
        """Set ``section.key`` (or ``model.kwargs.name`` / ``task.option``) with type and range checks."""
        parts = dotted.split(".")
        if len(parts) < 2 or parts[0] not in _sections():
            raise ValueError(f"config: {dotted!r} is not section.key; sections: {', '.join(_sections())}")
        section = getattr(self, parts[0])
        if parts[0] == "task" and parts[1] != "name":
            section.options[".".join(parts[1:])] = value  # validated by the task itself
            return
        fields = {f.name: f for f in dataclasses.fields(section)}
        hints = typing.get_type_hints(type(section))
        key = parts[1]
        if key not in hints:
            raise ValueError(f"config: unknown key {parts[0]}.{key}; known keys of {parts[0]}: {', '.join(fields)}")
        if len(parts) > 2:
            if hints[key] is not dict:
                raise ValueError(f"config: {parts[0]}.{key} is not a mapping, so {dotted!r} is invalid")
            getattr(section, key)[".".join(parts[2:])] = value
            return
        value = coerce_value(value, hints[key], dotted)
        check_range(value, fields[key].metadata.get("range"), dotted)
        setattr(section, key, value)

    def override(self, assignments: list[str]) -> None:
        """Apply ``key=value`` strings; the value is parsed as YAML (``1e-3``, ``true``, ``[160, 192]``, ``null``)."""
        for key, value in _parse(assignments):
            self.set(key, value)


def _parse(assignments: list[str] | None) -> list[tuple[str, Any]]:
    import yaml

    pairs = []
    for item in assignments or []:
        if "=" not in item:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return pairs


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def check_range(value: Any, spec: tuple | None, name: str) -> None:
    if spec is None or value is None:
        return
    lo, hi, lo_open, hi_open = spec
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        left = "any" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        right = "any" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        bounds = f"{left}, {right}" if lo is not None and hi is not None else (f"> {lo:g}" if lo_open else f">= {lo:g}")
        raise ValueError(f"config: {name} must be {bounds}, got {value!r}")


def coerce_value(value: Any, hint, name: str) -> Any:
    """Check ``value`` against a field's annotation; ints are accepted for floats, YAML's '1e-3' strings too."""
    options = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"config: {name} cannot be null")
    for t in options:
        if t is type(None):
            continue
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                continue
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is list and isinstance(value, (list, tuple)):
            return list(value)
        if t in (bool, str, dict) and isinstance(value, t):
            return value
    expected = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise ValueError(f"config: {name} expects {expected}, got {value!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file (if any), then ``--set`` overrides."""
    import yaml

    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of sections")
    return TrainConfig.from_dict(data, overrides)
