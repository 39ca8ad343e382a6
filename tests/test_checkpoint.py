"""Checkpoint loading: formats, wrappers, conversion, and refusal of anything that is not plain tensors."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import vitkit
from conftest import small_model
from vitkit.models._checkpoint import read_state_dict

NAME = "vit_tiny_patch16_224"


@pytest.fixture
def model():
    return small_model(NAME).eval()


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
