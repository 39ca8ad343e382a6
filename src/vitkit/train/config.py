"""Training configuration: one dataclass per section, loaded from YAML, overridden with ``--set a.b=value``.

Every key is validated: an unknown section or key, or a value of the wrong type, is an error that names it
(``--set optim.lrr=1e-3`` fails rather than being ignored). ``model.kwargs`` is the one free-form mapping:
it is passed to ``create_model`` (which rejects arguments the family does not take).

The defaults are the embedded run (``vitkit train`` with no arguments): a two-level NesT (0.4M params) on
scikit-learn's bundled 8x8 digits upsampled to 16x16, 30 epochs, about a minute and a half on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModelConfig:
    name: str = "nest_tiny_cifar"
    # architecture overrides for create_model; the default makes NesT-T/CIFAR a 2-level, width-96 model
    kwargs: dict = field(
        default_factory=lambda: dict(patch_size=2, num_levels=2, embed_dims=[96, 96], num_heads=[3, 3], depths=[2, 2])
    )
    img_size: int | None = 16  # None: the model's default input size
    pretrained: bool = False
    checkpoint: str | None = None  # initial weights (fine-tuning); not for resuming
    drop_path_rate: float = 0.0


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits | mnist | fashion_mnist | cifar10 | cifar100 | imagefolder
    root: str | None = None
    train_split: str = "train"  # TFDS-style slices: "test[:8000]", "train[:90%]"
    val_split: str | None = "test"  # None: no held-out evaluation
    download: bool = False
    batch_size: int = 32  # per process and micro-step; the base batch of the multi-scale sampler
    eval_batch_size: int = 256
    num_workers: int = 0
    mean: list | None = None  # None: the model's data config
    std: list | None = None
    multiscale: bool = False  # MobileViT's multi-scale sampler with variable batch size
    resolutions: list = field(default_factory=lambda: [160, 192, 256, 288, 320])
    max_bad_images: int = 20  # consecutive undecodable images before the run aborts


@dataclass
class AugConfig:
    crop: str = "pad"  # rrc | pad | canvas | resize
    scale: list = field(default_factory=lambda: [0.08, 1.0])
    pad: int = 2
    hflip: float = 0.0
    randaugment: str | None = None  # e.g. "rand-m9-mstd0.5"
    erasing: float = 0.0
    mixup: float = 0.0  # Beta alpha; 0 disables
    cutmix: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float | None = None  # max global grad norm
    accum_steps: int = 1


@dataclass
class ScheduleConfig:
    epochs: int = 30
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16 (fp16: CUDA only)
    channels_last: bool = False
    compile: bool = False
    ema_decay: float = 0.99  # 0 disables EMA weights
    extra_loss_weights: dict = field(default_factory=dict)  # model.extra_losses() terms, e.g. {dp: 1.0}
    output: str | None = None  # run folder; default runs/<model>-<dataset>[-N]
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (0: at epoch ends only)
    log_every: int = 10
    tensorboard: bool = False
    max_steps: int = 0  # stop after this many optimizer steps (smoke runs); 0: train all epochs
    max_nonfinite: int = 5  # consecutive NaN/Inf losses before the run aborts
    threads: int = 0  # torch intra-op threads (0: leave torch's default)
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> TrainConfig:
        cfg = cls()
        for section, values in (d or {}).items():
            if section not in _sections():
                raise ValueError(f"config: unknown section {section!r}; known: {', '.join(_sections())}")
            if not isinstance(values, dict):
                raise ValueError(f"config: section {section!r} must be a mapping, got {values!r}")
            # the model name first: naming a model resets the default run's kwargs/img_size (see ``set``)
            for key, value in sorted(values.items(), key=lambda kv: kv[0] != "name"):
                cfg.set(f"{section}.{key}", value)
        return cfg

    def set(self, dotted: str, value: Any) -> None:
        """Set ``section.key`` (or ``model.kwargs.name`` / ``train.extra_loss_weights.name``) with type checks."""
        parts = dotted.split(".")
        if len(parts) < 2 or parts[0] not in _sections():
            raise ValueError(f"config: {dotted!r} is not section.key; sections: {', '.join(_sections())}")
        section = getattr(self, parts[0])
        hints = typing.get_type_hints(type(section))
        key = parts[1]
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(section))
            raise ValueError(f"config: unknown key {parts[0]}.{key}; known keys of {parts[0]}: {known}")
        if len(parts) > 2:
            if hints[key] is not dict:
                raise ValueError(f"config: {parts[0]}.{key} is not a mapping, so {dotted!r} is invalid")
            getattr(section, key)[".".join(parts[2:])] = value
            return
        value = _coerce(value, hints[key], dotted)
        if dotted == "model.name" and value != section.name:
            # the architecture overrides and size of the default run belong to its model, not to the new one
            section.kwargs, section.img_size = {}, None
        setattr(section, key, value)

    def override(self, assignments: list[str]) -> None:
        """Apply ``key=value`` strings; the value is parsed as YAML (``1e-3``, ``true``, ``[160, 192]``, ``null``)."""
        import yaml

        for item in assignments or []:
            if "=" not in item:
                raise ValueError(f"--set expects section.key=value, got {item!r}")
            key, raw = item.split("=", 1)
            self.set(key.strip(), yaml.safe_load(raw) if raw.strip() else None)


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _coerce(value: Any, hint, name: str) -> Any:
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
    cfg = TrainConfig.from_dict(data)
    cfg.override(overrides or [])
    return cfg
