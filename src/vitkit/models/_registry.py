"""The model registry: names -> builders, default data configs and pretrained weight tags.

Architecture arguments live in each family's builder; everything about data and weights (input
size, normalisation, crop, where a checkpoint comes from, its licence) lives here, apart from the
architecture, as in timm's ``pretrained_cfg``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PretrainedCfg:
    """Where a published checkpoint comes from and how its inputs must be prepared."""

    tag: str
    hf_hub_id: str | None = None
    url: str | None = None
    filename: str = "model.safetensors"
    sha256: str | None = None
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.9
    license: str = "unknown"


@dataclass
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    family: str
    default_cfg: dict[str, Any]
    pretrained: dict[str, PretrainedCfg] = field(default_factory=dict)
    checkpoint_filter: Callable[[dict, nn.Module], dict] | None = None

    @property
    def default_tag(self) -> str | None:
        return next(iter(self.pretrained), None)


_REGISTRY: dict[str, ModelEntry] = {}


def default_cfg(**kwargs: Any) -> dict[str, Any]:
    """The data config of a model built from scratch (overridden by a pretrained tag's values)."""
    cfg = dict(
        input_size=(3, 224, 224),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bicubic",
        crop_pct=0.9,
        first_conv="patch_embed.proj",
        classifier="head",
        test_input_size=None,  # a small size the registry-wide tests use; None -> input_size
    )
    cfg.update(kwargs)
    return cfg


DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")


def resolve_data_config(model: nn.Module) -> dict[str, Any]:
    """The preprocessing a model expects: input_size, mean, std, interpolation, crop_pct."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    missing = [k for k in DATA_CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"model has no data config for {missing}; build it with vitkit.create_model")
    return {k: cfg[k] for k in DATA_CONFIG_KEYS}


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    family: str | None = None,
    cfg: dict[str, Any] | None = None,
    pretrained: list[PretrainedCfg] | None = None,
    checkpoint_filter: Callable[[dict, nn.Module], dict] | None = None,
):
    """Register a model builder under its function name. Usable bare or with arguments.

    Example::

        @register_model(family="vit", cfg=default_cfg(input_size=(3, 384, 384)))
        def my_vit_384(**kwargs):
            return VisionTransformer(img_size=384, **kwargs)
    """

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = f.__name__
        fam = family or f.__module__.rsplit(".", 1)[-1]
        tags = {p.tag: p for p in (pretrained or [])}
        _REGISTRY[name] = ModelEntry(name, f, fam, cfg or default_cfg(), tags, checkpoint_filter)
        return f

    return wrap(fn) if fn is not None else wrap


def split_model_name(name: str) -> tuple[str, str | None]:
    """``'vit_base_patch16_224.augreg_in21k'`` -> ``('vit_base_patch16_224', 'augreg_in21k')``."""
    arch, _, tag = name.partition(".")
    return arch, tag or None


def get_model_entry(name: str) -> ModelEntry:
    """Look up a registered architecture, with suggestions when the name is unknown."""
    arch, _ = split_model_name(name)
    if arch in _REGISTRY:
        return _REGISTRY[arch]
    close = difflib.get_close_matches(arch, list(_REGISTRY), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see vitkit.list_models()"
    raise ValueError(f"unknown model {arch!r}{hint}")


def list_models(pattern: str = "*", family: str | None = None, pretrained: bool = False) -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    names = [
        n
        for n, e in _REGISTRY.items()
        if fnmatch.fnmatch(n, pattern) and (family is None or e.family == family) and (not pretrained or e.pretrained)
    ]
    return sorted(names)


def list_families() -> list[str]:
    return sorted({e.family for e in _REGISTRY.values()})


def register_variant(
    name: str,
    model_cls: Callable[..., nn.Module],
    args: dict[str, Any],
    *,
    family: str,
    cfg: dict[str, Any],
    pretrained: list[PretrainedCfg] | None = None,
    checkpoint_filter: Callable[[dict, nn.Module], dict] | None = None,
) -> None:
    """Register ``name`` as ``model_cls(**args)``, with caller keyword arguments overriding ``args``."""

    def builder(**kwargs) -> nn.Module:
        return model_cls(**{**args, **kwargs})

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"{name}: {model_cls.__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"
    register_model(builder, family=family, cfg=cfg, pretrained=pretrained, checkpoint_filter=checkpoint_filter)
