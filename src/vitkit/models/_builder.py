"""``create_model``: build a registered model, load weights, wrap for ``features_only``."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from typing import Any

from torch import nn

from vitkit._io import download
from vitkit.models._base import ModelArgError
from vitkit.models._checkpoint import load_checkpoint
from vitkit.models._features import FeatureGetterNet
from vitkit.models._registry import ModelEntry, PretrainedCfg, get_model_entry, split_model_name

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin")


def weights_dir() -> Path:
    """Where pretrained weights are looked for: ``$VITKIT_HOME/weights`` (default ``~/.cache/vitkit/weights``)."""
    home = os.environ.get("VITKIT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "vitkit")
    return Path(home) / "weights"


def resolve_pretrained(entry: ModelEntry, tag: str | None) -> PretrainedCfg:
    tag = tag or entry.default_tag
    if tag is None:
        raise ValueError(f"{entry.name}: no pretrained weights are published for this architecture")
    if tag not in entry.pretrained:
        known = ", ".join(entry.pretrained) or "none"
        raise ValueError(f"{entry.name}: unknown pretrained tag {tag!r}; known tags: {known}")
    return entry.pretrained[tag]


def pretrained_file(entry: ModelEntry, cfg: PretrainedCfg) -> Path:
    """The local weight file for a tag, fetching it once when a network is allowed.

    The file is looked for at ``weights_dir()/<model>.<tag>/<filename>`` (or any of .safetensors,
    .pth, .bin there). Fetching is skipped when ``VITKIT_OFFLINE=1``; downloads are verified against
    ``sha256`` when the config has one and only renamed into place once complete.
    """
    folder = weights_dir() / f"{entry.name}.{cfg.tag}"
    for cand in [folder / cfg.filename] + [folder / f"model{s}" for s in WEIGHT_SUFFIXES]:
        if cand.is_file():
            return cand
    target = folder / cfg.filename
    url = cfg.url or (f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{cfg.filename}" if cfg.hf_hub_id else None)
    where = f"place the weight file at {str(target)!r} (set VITKIT_HOME to move the cache)"
    if url is None:
        raise RuntimeError(f"{entry.name}.{cfg.tag}: no download source is known; {where}")
    if os.environ.get("VITKIT_OFFLINE", "") not in ("", "0"):
        raise RuntimeError(f"{entry.name}.{cfg.tag}: weights not found and VITKIT_OFFLINE is set; {where} ({url})")
    try:
        download(url, target, cfg.sha256)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise RuntimeError(f"{entry.name}.{cfg.tag}: could not download {url} ({e}); {where}") from None
    return target


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    num_classes: int | None = None,
    in_chans: int = 3,
    img_size: int | tuple[int, int] | None = None,
    drop_path_rate: float | None = None,
    features_only: bool = False,
    out_indices: int | list[int] | tuple[int, ...] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Create a registered model by name, optionally with weights.

    Args:
        name: a registered name, optionally with a pretrained tag (``"vit_base_patch16_224.augreg_in21k"``).
        pretrained: load the tag's published weights (from the local cache, or fetched once).
        checkpoint_path: a vitkit or timm-format checkpoint to load (after ``pretrained``).
        num_classes: classifier size; 0 removes the classifier. Defaults to the weights' or 1000.
        in_chans: input channels; pretrained first-layer filters are adapted when it differs.
        img_size: the default input size (an int or ``(height, width)``) of the data config, in every family;
            families whose parameters depend on it (ViT position embeddings, NesT blocks, LaViT attention maps) are
            built for it, and weights trained at another size are resampled. A size the model cannot take (not a
            multiple of its patch/stride, below its minimum) is an error here, naming what it needs.
        drop_path_rate: stochastic-depth rate.
        features_only: return a backbone whose forward gives the NCHW maps of ``feature_info``.
        out_indices: which feature stages ``features_only`` returns.
        **overrides: further architecture arguments of the family (e.g. ``dynamic_img_size=True``).
    """
    entry = get_model_entry(name)
    _, tag = split_model_name(name)
    pcfg = resolve_pretrained(entry, tag) if (pretrained or tag) else None
    kwargs = dict(overrides)
    kwargs["in_chans"] = in_chans
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    elif (pcfg or entry.pretrained.get(entry.default_tag)) is not None:
        # timm's rule: the classifier size follows the (default) weights, e.g. 0 for headless in21k weights
        kwargs["num_classes"] = (pcfg or entry.pretrained[entry.default_tag]).num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        model = entry.builder(**kwargs)
    except TypeError as e:
        raise ValueError(f"{entry.name}: invalid argument ({e})") from None
    except ModelArgError as e:
        raise e.named(entry.name) from None

    cfg = dict(entry.default_cfg)
    if pcfg is not None:
        cfg.update(input_size=pcfg.input_size, mean=pcfg.mean, std=pcfg.std)
        cfg.update(interpolation=pcfg.interpolation, crop_pct=pcfg.crop_pct, tag=pcfg.tag, license=pcfg.license)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        cfg["input_size"] = (in_chans, h, w)
    else:
        cfg["input_size"] = (in_chans, *cfg["input_size"][1:])
    model.model_name = entry.name
    model.pretrained_cfg = cfg

    # a user who asks for another num_classes is fine-tuning: a classifier of the wrong size is left out
    drop_head = None if num_classes is not None else False
    if pretrained:
        load_checkpoint(model, pretrained_file(entry, pcfg), entry.checkpoint_filter, drop_head)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, entry.checkpoint_filter, drop_head)
    if features_only:
        model = FeatureGetterNet(model, out_indices)
    elif out_indices is not None:
        raise ValueError(f"{entry.name}: out_indices is only used with features_only=True")
    return model
