"""``create_model``: build a registered model, load weights, wrap for ``features_only``."""

from __future__ import annotations

import os
import re
import urllib.error
from pathlib import Path
from typing import Any

from torch import nn

from vitkit._io import download, file_digest
from vitkit.models._base import ModelArgError, _is_int
from vitkit.models._checkpoint import clean_message, load_checkpoint
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


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def pretrained_file(entry: ModelEntry, cfg: PretrainedCfg) -> Path:
    """The local weight file for a tag, fetching it once when a network is allowed.

    Looked for first at ``weights_dir()/<model>.<tag>/<filename>`` (or any of .safetensors, .pth, .bin there).
    Otherwise a tag with ``hf_hub_id`` (``"org/repo"``, or ``"org/repo@revision"`` to pin a branch, tag or commit)
    comes through ``huggingface_hub``: its cache is timm's, so weights already downloaded for timm are used as
    they are; etags, revisions, ``HF_TOKEN`` for gated repositories and ``HF_HUB_OFFLINE`` behave as there.
    ``VITKIT_OFFLINE=1`` means the same as ``HF_HUB_OFFLINE=1``: only files already on disk are used. A file the
    Hub stores by sha256 (every weight file, through Git LFS) is checked against it when it was just downloaded;
    a tag's own ``sha256`` is checked too. A tag with only a ``url`` is downloaded to the first place, verified
    against ``sha256`` when the tag has one.
    """
    folder = weights_dir() / f"{entry.name}.{cfg.tag}"
    for cand in [folder / cfg.filename] + [folder / f"model{s}" for s in WEIGHT_SUFFIXES]:
        if cand.is_file():
            return cand
    target = folder / cfg.filename
    where = f"place the weight file at {str(target)!r} (set VITKIT_HOME to move the cache)"
    if cfg.hf_hub_id:
        return _hub_file(f"{entry.name}.{cfg.tag}", cfg, where)
    if cfg.url is None:
        raise RuntimeError(f"{entry.name}.{cfg.tag}: no download source is known; {where}")
    if _env_true("VITKIT_OFFLINE") or _env_true("HF_HUB_OFFLINE"):
        raise RuntimeError(f"{entry.name}.{cfg.tag}: weights not found and offline mode is set; {where} ({cfg.url})")
    try:
        download(cfg.url, target, cfg.sha256)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise RuntimeError(f"{entry.name}.{cfg.tag}: could not download {cfg.url} ({e}); {where}") from None
    return target


def _hub_file(name: str, cfg: PretrainedCfg, where: str) -> Path:
    """``cfg.filename`` of ``cfg.hf_hub_id`` from the Hugging Face cache, downloaded there once if allowed."""
    try:
        import huggingface_hub
        from huggingface_hub import constants as hf_constants
        from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise RuntimeError(
            f"{name}: pretrained weights come from the Hugging Face Hub, which needs the huggingface_hub package "
            f"(pip install 'huggingface_hub>=0.20'); or {where}"
        ) from None
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    revision = revision or None
    offline = _env_true("VITKIT_OFFLINE") or _env_true("HF_HUB_OFFLINE") or hf_constants.HF_HUB_OFFLINE
    source = f"{repo_id}/{cfg.filename}" + (f"@{revision}" if revision else "")
    try:
        before = huggingface_hub.try_to_load_from_cache(repo_id, cfg.filename, revision=revision)
        path = huggingface_hub.hf_hub_download(
            repo_id, cfg.filename, revision=revision, local_files_only=offline, library_name="vitkit"
        )
    except LocalEntryNotFoundError:
        mode = "offline mode is set (VITKIT_OFFLINE / HF_HUB_OFFLINE)" if offline else "the Hub could not be reached"
        raise RuntimeError(
            f"{name}: weights not found: {source} is not in the Hugging Face cache and {mode}; {where}, or "
            f"download it once with network access (`hf download {repo_id} {cfg.filename}`; "
            "`huggingface-cli download` before huggingface_hub 1.0)"
        ) from None
    except GatedRepoError:
        raise RuntimeError(
            f"{name}: {repo_id} is a gated repository: accept its terms on huggingface.co and log in "
            f"(`hf auth login`, `huggingface-cli login` before huggingface_hub 1.0, or set HF_TOKEN); or {where}"
        ) from None
    except RepositoryNotFoundError:
        raise RuntimeError(
            f"{name}: {repo_id} was not found on the Hub (or is private: set HF_TOKEN); {where}"
        ) from None
    except Exception as e:  # noqa: BLE001 - HTTP, revision, name validation and disk errors all end the same way
        msg = clean_message(str(e)).strip().splitlines()
        raise RuntimeError(
            f"{name}: could not fetch {source} ({type(e).__name__}: {msg[0] if msg else ''}); {where}"
        ) from None
    # the cache answers with a path (hit), None or a "known missing" sentinel; paths are compared as files, since
    # hf_hub_download resolves the cache folder and try_to_load_from_cache does not
    cached = isinstance(before, str) and os.path.exists(before) and os.path.samefile(before, path)
    if not cached:
        _verify_download(name, Path(path), cfg.sha256)
    return Path(path)


def _verify_download(name: str, path: Path, sha256: str | None) -> None:
    """A fresh download must hash to the sha256 the Hub stores it under and to the tag's own ``sha256``.

    The Hub's hash is the name of the repository blob the snapshot entry links to (``blobs/<sha256>``: every weight
    file, through Git LFS; small git files have a 40-digit git hash, not checked). Only that first link is read:
    huggingface_hub may link the blob on to a store shared between repositories, named by another hash. A file that
    does not match is removed from this repository's cache (snapshot link and blob, never a shared target), so the
    next attempt downloads it again.
    """
    blob = Path(os.path.normpath(path.parent / os.readlink(path))) if path.is_symlink() else None
    etag = blob.name if blob is not None and re.fullmatch(r"[0-9a-f]{64}", blob.name) else None
    expected = {h.lower() for h in (etag, sha256) if h}
    if not expected:
        return
    got = file_digest(path, "sha256")
    if expected == {got}:
        return
    removed = True
    for p in (path, blob):
        try:
            if p is not None:
                p.unlink(missing_ok=True)
        except OSError:  # a read-only cache
            removed = False
    want = " and ".join(sorted(expected))
    fate = "it was removed from the cache: try again" if removed else "remove it from the (read-only) cache by hand"
    raise RuntimeError(f"{name}: the downloaded {path.name} is corrupt (sha256 {got}, expected {want}); {fate}")


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
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 0):
        raise ValueError(
            f"{entry.name}: num_classes must be an int >= 0 (0: no classifier, forward gives pooled features), "
            f"got {num_classes!r}"
        )
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
