"""Checkpoint loading: formats, wrappers, conversion, and refusal of anything that is not plain tensors."""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import sys

import pytest
import torch

import vitkit
from conftest import small_model
from vitkit.models._builder import pretrained_file
from vitkit.models._checkpoint import read_state_dict
from vitkit.models._registry import ModelEntry, PretrainedCfg, default_cfg

NAME = "vit_tiny_patch16_224"
TAG = "augreg_in21k_ft_in1k"
HUB_REPO = f"timm/{NAME}.{TAG}"  # the repository the tag names (timm's)


@pytest.fixture
def model():
    return small_model(NAME).eval()


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test's own, no offline switches and no weights under VITKIT_HOME."""
    cache = tmp_path / "hf_hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("VITKIT_HOME", str(tmp_path / "vitkit_home"))
    for var in ("HF_HUB_OFFLINE", "VITKIT_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    try:
        from huggingface_hub import constants
    except ImportError:
        return cache
    # huggingface_hub reads these when it is imported; the test's values must hold whatever imported it first
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "module"])
def test_pth_formats_load(model, tmp_path, wrapper):
    sd = model.state_dict()
    if wrapper == "module":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif wrapper:
        obj = {wrapper: sd, "epoch": 3} if wrapper == "state_dict" else {wrapper: sd}
    else:
        obj = sd
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    loaded = vitkit.create_model(NAME, img_size=64, checkpoint_path=path)
    assert _same(model, loaded)


def test_missing_and_unexpected_keys_are_listed(model, tmp_path):
    sd = dict(model.state_dict())
    sd.pop("blocks.3.attn.qkv.weight")
    sd["blocks.99.extra"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(RuntimeError) as e:
        vitkit.create_model(NAME, img_size=64, checkpoint_path=path)
    msg = str(e.value)
    assert "vit_tiny_patch16_224" in msg
    assert "missing keys (1): blocks.3.attn.qkv.weight" in msg
    assert "unexpected keys (1): blocks.99.extra" in msg


def test_shape_mismatch_is_named(model, tmp_path):
    sd = dict(model.state_dict())
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(10, 192)
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match=r"blocks.0.mlp.fc1.weight: checkpoint \(10, 192\) vs model \(768, 192\)"):
        vitkit.create_model(NAME, img_size=64, checkpoint_path=path)


def test_new_num_classes_drops_classifier_only(model, tmp_path):
    path = vitkit.save_state_dict(model, tmp_path / "m.safetensors")
    ft = vitkit.create_model(NAME, img_size=64, num_classes=10, checkpoint_path=path)
    assert ft.head.out_features == 10
    torch.testing.assert_close(ft.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    headless = vitkit.create_model(NAME, img_size=64, num_classes=0, checkpoint_path=path)
    assert isinstance(headless.head, torch.nn.Identity)


def test_in_chans_adapts_first_conv(model, tmp_path):
    path = vitkit.save_state_dict(model, tmp_path / "m.safetensors")
    gray = vitkit.create_model(NAME, img_size=64, in_chans=1, checkpoint_path=path)
    torch.testing.assert_close(gray.patch_embed.proj.weight, model.patch_embed.proj.weight.sum(1, keepdim=True))
    # a grey image replicated to RGB gives the same result as the adapted single-channel model
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray.eval()(x), model(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_truncated_safetensors(model, tmp_path):
    path = vitkit.save_state_dict(model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        vitkit.create_model(NAME, img_size=64, checkpoint_path=path)


def test_truncated_pth(model, tmp_path):
    path = tmp_path / "m.pth"
    torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="could not be read"):
        vitkit.create_model(NAME, img_size=64, checkpoint_path=path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")


def test_non_tensor_values(model, tmp_path):
    sd = dict(model.state_dict())
    sd["note"] = "hello"
    sd["lr"] = 0.1
    path = tmp_path / "mixed.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"not a state dict: non-tensor values at 'note' \(str\), 'lr' \(float\)"):
        vitkit.create_model(NAME, img_size=64, checkpoint_path=path)


def test_not_a_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="holds a list, expected a dict of tensors"):
        read_state_dict(path)


class _Boom:
    """Unpickling this would run ``os.system``; a safe loader must refuse it without running it."""

    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    _Boom.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Boom()}, f)
    with pytest.raises(ValueError, match="refused: it contains pickled objects other than tensors"):
        vitkit.create_model(NAME, img_size=64, checkpoint_path=path)
    assert not marker.exists()
    # the same inside torch's zip format
    path2 = tmp_path / "evil2.pth"
    torch.save({"weight": _Boom()}, path2)
    with pytest.raises(ValueError, match="refused"):
        read_state_dict(path2)
    assert not marker.exists()


def test_save_is_atomic_and_keeps_old_file_on_failure(model, tmp_path, monkeypatch):
    path = vitkit.save_state_dict(model, tmp_path / "keep.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        vitkit.save_state_dict(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]  # no temp files left


def test_pretrained_without_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("VITKIT_HOME", str(tmp_path))
    monkeypatch.setenv("VITKIT_OFFLINE", "1")
    expected = tmp_path / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k" / "model.safetensors"
    with pytest.raises(RuntimeError, match="place the weight file at") as e:
        vitkit.create_model(NAME, pretrained=True)
    assert str(expected) in str(e.value)


def test_pretrained_loads_local_weights_and_data_config(tmp_path, monkeypatch, model):
    monkeypatch.setenv("VITKIT_HOME", str(tmp_path))
    monkeypatch.setenv("VITKIT_OFFLINE", "1")
    full = vitkit.create_model(NAME)
    target = tmp_path / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k" / "model.safetensors"
    vitkit.save_state_dict(full, target)
    loaded = vitkit.create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True)
    assert _same(full, loaded)
    cfg = vitkit.resolve_data_config(loaded)
    assert cfg == {
        "input_size": (3, 224, 224),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "interpolation": "bicubic",
        "crop_pct": 0.9,
    }
    assert loaded.pretrained_cfg["license"] == "apache-2.0"


def test_unknown_pretrained_tag():
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope'; known tags: augreg_in21k_ft_in1k"):
        vitkit.create_model("vit_tiny_patch16_224.nope", pretrained=True)


def test_no_weights_published():
    with pytest.raises(ValueError, match="no pretrained weights are published"):
        vitkit.create_model("vit_base_r26_s32_224", pretrained=True)


# ---- pretrained weights through huggingface_hub (a local cache laid out as the Hub's; never the network) --------


def _put_in_hf_cache(
    cache, repo_id: str, filename: str, data: bytes, revision: str = "main", sha: str | None = None, shared=False
):
    """Lay a file out as huggingface_hub caches it: ``models--org--name/{blobs/<sha256>, refs/<revision>,
    snapshots/<commit>/<filename> -> ../../blobs/<sha256>}``. Returns the snapshot path. ``shared``: the repository
    blob is itself a link into the store shared between repositories (``<cache>/blobs/<xx>/<xet hash>``, another
    64-digit hash), as huggingface_hub 1.x lays out Xet downloads."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    sha = sha or hashlib.sha256(data).hexdigest()
    commit = hashlib.sha1(repo_id.encode() + revision.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    if shared:
        xet = hashlib.sha256(b"xet" + data).hexdigest()
        target = cache / "blobs" / xet[:2] / xet
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        (repo / "blobs" / sha).symlink_to(os.path.relpath(target, repo / "blobs"))
    else:
        (repo / "blobs" / sha).write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snap = repo / "snapshots" / commit / filename
    snap.parent.mkdir(parents=True, exist_ok=True)
    snap.symlink_to(os.path.relpath(repo / "blobs" / sha, snap.parent))
    return snap


def _weights_bytes(model, tmp_path) -> bytes:
    return vitkit.save_state_dict(model, tmp_path / "w.safetensors").read_bytes()


@pytest.fixture
def hub(monkeypatch, hf_cache):
    """``huggingface_hub.hf_hub_download`` as a fake Hub: the files in ``hub.files`` are "downloaded" into the
    cache when asked (a file already there is returned as is); every call's arguments are recorded."""
    hf = pytest.importorskip("huggingface_hub")

    class FakeHub:
        files: dict[tuple[str, str], bytes] = {}
        calls: list[dict] = []
        corrupt = False
        shared = False

    real = hf.hf_hub_download

    def fake_download(repo_id, filename, *, revision=None, local_files_only=False, **kw):
        FakeHub.calls.append(dict(repo_id=repo_id, filename=filename, revision=revision, offline=local_files_only))
        if local_files_only or (repo_id, filename) not in FakeHub.files:
            return real(repo_id, filename, revision=revision, local_files_only=True)
        cached = hf.try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(cached, str):  # the real one answers under the resolved cache folder
            cache = hf.constants.HF_HUB_CACHE
            return os.path.join(os.path.realpath(cache), os.path.relpath(cached, cache))
        data = FakeHub.files[repo_id, filename]
        # a corrupt transfer: the bytes differ from the sha256 the Hub lists the file under
        sha = hashlib.sha256(data).hexdigest()
        data = data[:-10] + b"\0" * 10 if FakeHub.corrupt else data
        return str(_put_in_hf_cache(hf_cache, repo_id, filename, data, revision or "main", sha, FakeHub.shared))

    monkeypatch.setattr(hf, "hf_hub_download", fake_download)
    return FakeHub


def test_pretrained_downloads_once_through_huggingface_hub(hub, tmp_path):
    full = vitkit.create_model(NAME)
    hub.files[HUB_REPO, "model.safetensors"] = _weights_bytes(full, tmp_path)
    loaded = vitkit.create_model(f"{NAME}.{TAG}", pretrained=True)
    assert _same(full, loaded)
    assert hub.calls == [dict(repo_id=HUB_REPO, filename="model.safetensors", revision=None, offline=False)]
    # the second time the file comes from the cache (the real library would only compare etags)
    again = vitkit.create_model(f"{NAME}.{TAG}", pretrained=True)
    assert _same(full, again) and len(hub.calls) == 2


def test_shared_blob_store_downloads_are_checked_against_the_repository_blob(hub, hf_cache, tmp_path):
    """A blob linked on into the shared store (named by its Xet hash) is checked against the sha256 the repository
    blob is named by; a corrupt one loses its repository link and blob, never the shared target."""
    full = vitkit.create_model(NAME)
    hub.files[HUB_REPO, "model.safetensors"] = _weights_bytes(full, tmp_path)
    hub.shared = hub.corrupt = True
    with pytest.raises(RuntimeError, match="is corrupt .* it was removed from the cache: try again"):
        vitkit.create_model(NAME, pretrained=True)
    repo = hf_cache / ("models--" + HUB_REPO.replace("/", "--"))
    assert not list(repo.rglob("blobs/*")) and not list(repo.rglob("snapshots/*/*"))
    assert len(list((hf_cache / "blobs").rglob("*/*"))) == 1  # the shared store is left alone
    hub.corrupt = False
    assert _same(full, vitkit.create_model(NAME, pretrained=True))


def test_a_cache_hit_is_not_hashed_again_even_through_a_linked_cache_folder(hub, hf_cache, tmp_path, monkeypatch):
    from huggingface_hub import constants

    import vitkit.models._builder as builder
    from vitkit._io import file_digest

    full = vitkit.create_model(NAME)
    hub.files[HUB_REPO, "model.safetensors"] = _weights_bytes(full, tmp_path)
    hashed = []
    monkeypatch.setattr(builder, "file_digest", lambda p, algo: hashed.append(p) or file_digest(p, algo))
    vitkit.create_model(NAME, pretrained=True)
    assert len(hashed) == 1  # the fresh download
    link = tmp_path / "linked_cache"
    link.symlink_to(hf_cache)  # the same cache through another path (a linked home folder, macOS /var)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(link))
    assert _same(full, vitkit.create_model(NAME, pretrained=True)) and len(hashed) == 1


@pytest.mark.parametrize("offline_var", ["HF_HUB_OFFLINE", "VITKIT_OFFLINE"])
def test_pretrained_found_in_the_timm_cache_offline(hub, hf_cache, tmp_path, monkeypatch, offline_var):
    """Weights a timm user already has in the Hugging Face cache load offline, without a second copy."""
    full = vitkit.create_model(NAME)
    snap = _put_in_hf_cache(hf_cache, HUB_REPO, "model.safetensors", _weights_bytes(full, tmp_path))
    monkeypatch.setenv(offline_var, "1")
    loaded = vitkit.create_model(f"{NAME}.{TAG}", pretrained=True)
    assert _same(full, loaded)
    assert hub.calls[-1]["offline"] is True
    assert not (tmp_path / "vitkit_home").exists()  # nothing copied into vitkit's own folder
    assert snap.is_symlink()


def test_pretrained_offline_and_not_cached_says_where(hub, monkeypatch):
    monkeypatch.setenv("VITKIT_OFFLINE", "1")
    with pytest.raises(RuntimeError) as e:
        vitkit.create_model(NAME, pretrained=True)
    msg = str(e.value)
    assert msg.startswith(f"{NAME}.{TAG}: weights not found: {HUB_REPO}/model.safetensors is not in the Hugging Face")
    assert "offline mode is set" in msg and "place the weight file at" in msg
    assert hub.calls == [dict(repo_id=HUB_REPO, filename="model.safetensors", revision=None, offline=True)]


def test_corrupt_download_is_refused_and_removed_from_the_cache(hub, hf_cache, tmp_path):
    full = vitkit.create_model(NAME)
    data = _weights_bytes(full, tmp_path)
    hub.files[HUB_REPO, "model.safetensors"] = data
    hub.corrupt = True
    with pytest.raises(RuntimeError, match=r"downloaded model.safetensors is corrupt \(sha256 [0-9a-f]{64}, expected"):
        vitkit.create_model(NAME, pretrained=True)
    assert not list(hf_cache.rglob("blobs/*")) and not list(hf_cache.rglob("snapshots/*/*"))  # link and blob gone
    hub.corrupt = False  # the next attempt downloads it again
    assert _same(full, vitkit.create_model(NAME, pretrained=True))


def test_pinned_revision_and_own_sha256(hub, tmp_path):
    data = b"not really weights"
    hub.files["org/repo", "w.safetensors"] = data
    entry = ModelEntry("some_model", lambda **kw: None, "vit", default_cfg())
    cfg = PretrainedCfg(tag="t", hf_hub_id="org/repo@v1.0", filename="w.safetensors", sha256="0" * 64)
    with pytest.raises(RuntimeError, match="is corrupt"):  # the Hub's sha256 holds, the tag's own does not
        pretrained_file(entry, cfg)
    assert hub.calls[-1] == dict(repo_id="org/repo", filename="w.safetensors", revision="v1.0", offline=False)
    cfg = PretrainedCfg(
        tag="t", hf_hub_id="org/repo@v1.0", filename="w.safetensors", sha256=hashlib.sha256(data).hexdigest()
    )
    assert pretrained_file(entry, cfg).read_bytes() == data


def test_pretrained_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if it were not installed
    with pytest.raises(
        RuntimeError, match=r"needs the huggingface_hub package \(pip install 'huggingface_hub>=0.20'\)"
    ):
        vitkit.create_model(NAME, pretrained=True)


def test_local_weights_are_found_before_the_hub(hub, tmp_path, monkeypatch):
    full = vitkit.create_model(NAME)
    vitkit.save_state_dict(full, tmp_path / "vitkit_home" / "weights" / f"{NAME}.{TAG}" / "model.safetensors")
    assert _same(full, vitkit.create_model(NAME, pretrained=True)) and hub.calls == []


# ---- timm training checkpoints: tensors, optimizer state and an argparse.Namespace ----------------------------


def _timm_train_checkpoint(model, args: argparse.Namespace) -> dict:
    """What timm's train.py (CheckpointSaver) writes."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    opt.step()
    return {
        "epoch": 3,
        "arch": args.model,
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "version": 2,
        "args": args,
        "metric": 71.5,
    }


@pytest.mark.skipif(
    not hasattr(torch.serialization, "safe_globals"), reason="torch < 2.5 has no weights-only allow-list to add to"
)
def test_timm_train_checkpoint_with_args_loads(model, tmp_path):
    args = argparse.Namespace(model=NAME, lr=0.1, sched="cosine", mean=None, input_size=[3, 64, 64], amp=True)
    path = tmp_path / "last.pth.tar"
    torch.save(_timm_train_checkpoint(model, args), path)
    loaded = vitkit.create_model(NAME, img_size=64, checkpoint_path=path)
    assert _same(model, loaded)


class _Hook:  # an importable class no allow-list names: refused without running anything
    pass


def test_other_objects_in_timm_args_are_refused_naming_the_class(model, tmp_path):
    path = tmp_path / "hooked.pth.tar"
    torch.save(_timm_train_checkpoint(model, argparse.Namespace(model=NAME, hook=_Hook())), path)
    with pytest.raises(ValueError) as e:
        vitkit.create_model(NAME, img_size=64, checkpoint_path=path)
    msg = str(e.value)
    assert "Unsupported global: GLOBAL test_checkpoint._Hook" in msg, msg
    assert "\x1b" not in msg and "weights_only" not in msg and "(1)" not in msg, msg


def test_code_hidden_in_timm_args_is_still_refused(model, tmp_path):
    marker = tmp_path / "pwned"
    _Boom.marker = marker
    path = tmp_path / "evil.pth.tar"
    torch.save(_timm_train_checkpoint(model, argparse.Namespace(model=NAME, hook=_Boom())), path)
    with pytest.raises(ValueError, match="refused") as e:
        vitkit.create_model(NAME, img_size=64, checkpoint_path=path)
    assert not marker.exists()
    msg = str(e.value)
    # torch's reason, without its terminal escape codes or its advice to load with weights_only=False
    assert "system" in msg and "\x1b" not in msg and "weights_only" not in msg, msg


# ---- a checkpoint of another architecture: a summary, not a list of every key -----------------------------------


def _saved_untrained(name: str, path, **kwargs):
    """``name``'s weights (uninitialised values: only names and shapes matter here) saved as vitkit saves them."""
    with torch.device("meta"):
        m = vitkit.create_model(name, **kwargs)
    m = m.to_empty(device="cpu")
    if str(path).endswith(".safetensors"):
        return vitkit.save_state_dict(m, path)
    torch.save(m.state_dict(), path)
    return path


def test_other_architecture_is_summarised_with_the_models_it_fits(tmp_path):
    path = _saved_untrained("vit_small_patch16_224", tmp_path / "small.safetensors")
    with pytest.raises(RuntimeError) as e:
        vitkit.create_model(NAME, checkpoint_path=path)
    msg = str(e.value)
    assert len(msg) < 1500, msg  # was ~9,500 characters: every key
    assert msg.startswith(f"{NAME}: cannot load {str(path)!r}: it does not fit this model")
    assert "the checkpoint was saved from 'vit_small_patch16_224'" in msg  # the file's vitkit.model metadata
    n = int(re.search(r"(\d+) of 152 tensors have other shapes", msg).group(1))
    assert n > 140 and f"and {n - 5} more" in msg
    assert "blocks.0.attn.qkv.weight: checkpoint (1152, 384) vs model (576, 192)" in msg
    fits = re.search(r"registered models with these parameter shapes: (.*) \(create_model", msg).group(1)
    assert fits.startswith("vit_small_patch16_224, ") and "deit_small_patch16_224" in fits
    assert "vit_tiny" not in fits and "vit_base" not in fits


def test_other_family_without_a_stored_name_is_matched_by_shapes(tmp_path):
    path = _saved_untrained("nest_tiny", tmp_path / "weights.pth")
    with pytest.raises(RuntimeError) as e:
        vitkit.create_model(NAME, checkpoint_path=path)
    msg = str(e.value)
    assert "saved from" not in msg and len(msg) < 1500
    assert re.search(r"missing keys \(\d+\): cls_token, pos_embed, .* and \d+ more", msg)
    assert "registered models with these parameter shapes: nest_tiny, nest_tiny_jx" in msg


def test_a_checkpoint_with_another_classifier_says_which_num_classes(tmp_path):
    tuned = vitkit.create_model(NAME, img_size=64, num_classes=10)
    path = vitkit.save_state_dict(tuned, tmp_path / "tuned.safetensors")
    with pytest.raises(RuntimeError) as e:
        vitkit.create_model(NAME, img_size=64, checkpoint_path=path)  # the default 1,000 classes
    msg = str(e.value)
    assert "head.weight: checkpoint (10, 192) vs model (1000, 192)" in msg
    assert msg.endswith("the checkpoint has 10 classes; pass num_classes=10 to load it whole, or the number of "
                        "classes you want to fine-tune it to a new classifier")  # fmt: skip
    assert _same(vitkit.create_model(NAME, img_size=64, num_classes=10, checkpoint_path=path), tuned)


def test_no_registered_model_fits(model, tmp_path):
    small = vitkit.create_model(NAME, img_size=64, depth=3)  # architecture arguments of its own
    path = vitkit.save_state_dict(small, tmp_path / "m.safetensors")
    with pytest.raises(RuntimeError, match="no registered model has these parameter shapes"):
        vitkit.create_model(NAME, img_size=64, checkpoint_path=path)


# ---- a folder as checkpoint_path -------------------------------------------------------------------------------


def test_run_folder_loads_its_best_checkpoint_else_its_last(tmp_path):
    run = tmp_path / "runs" / "vit-digits"
    best, last = small_model(NAME), vitkit.create_model(NAME, img_size=64)
    for which, m in (("best", best), ("last", last)):  # complete checkpoints: weights and loop state
        vitkit.save_state_dict(m, run / "checkpoints" / which / "model.safetensors")
        torch.save({"step": 1}, run / "checkpoints" / which / "state.pt")
    (run / "checkpoints" / ".best.old").mkdir()  # a leftover of a crash mid-replace, without weights: not taken
    assert _same(vitkit.create_model(NAME, img_size=64, checkpoint_path=run), best)
    assert _same(vitkit.create_model(NAME, img_size=64, checkpoint_path=run / "checkpoints" / "last"), last)
    (run / "checkpoints" / "best" / "state.pt").unlink()  # an incomplete best checkpoint: the last one instead
    assert _same(vitkit.create_model(NAME, img_size=64, checkpoint_path=run), last)


def test_other_folder_names_the_files_to_pass(model, tmp_path):
    folder = tmp_path / "downloads"
    vitkit.save_state_dict(model, folder / "a.safetensors")
    (folder / "sub").mkdir()
    torch.save(model.state_dict(), folder / "sub" / "b.pth")
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(IsADirectoryError) as e:
        vitkit.create_model(NAME, img_size=64, checkpoint_path=folder)
    assert str(e.value) == (
        f"checkpoint {str(folder)!r} is a folder, not a file; pass one of its files: "
        f"{str(folder / 'a.safetensors')!r}, {str(folder / 'sub' / 'b.pth')!r}"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder, not a file; it holds no checkpoint file"):
        read_state_dict(empty)
