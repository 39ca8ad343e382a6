"""Package-level promises: no torchvision/timm, the registry API, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import vitkit
from vitkit.cli import main


def test_import_does_not_pull_torchvision_or_timm():
    code = "import sys, vitkit; print(sorted(m for m in ('torchvision', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_list_models_patterns_and_timm_names():
    names = vitkit.list_models()
    for n in ("vit_tiny_patch16_224", "vit_base_patch16_224", "vit_huge_patch14_224", "vit_base_r50_s16_224"):
        assert n in names
    assert vitkit.list_models("vit_*_patch32_*") == sorted(
        n for n in names if n.startswith("vit_") and "_patch32_" in n
    )
    assert vitkit.list_models(pretrained=True)
    assert "vit" in vitkit.list_families()


def test_register_model_plugs_into_create_model():
    from vitkit.models.vit import VisionTransformer

    @vitkit.register_model(family="test")
    def my_test_vit(**kwargs):
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, **kwargs)

    try:
        model = vitkit.create_model("my_test_vit", num_classes=3)
        assert model.model_name == "my_test_vit"
        assert "my_test_vit" in vitkit.list_models(family="test")
    finally:
        from vitkit.models._registry import _REGISTRY

        _REGISTRY.pop("my_test_vit")


def test_cli_models(capsys):
    assert main(["models", "vit_tiny*"]) == 0
    out = capsys.readouterr().out
    assert "vit_tiny_patch16_224" in out and "5.72M" in out


def test_cli_info_json(capsys):
    assert main(["info", "vit_base_patch16_224", "--json", "--no-forward"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 86_567_656
    assert abs(info["gmacs"] - 17.564) < 1e-3
    assert len(info["feature_info"]) == 12 and info["feature_info"][0]["reduction"] == 16


def test_cli_info_forward(capsys):
    assert main(["info", "vit_tiny_r_s16_p8_224", "--img-size", "64"]) == 0
    assert "-> (1, 1000)" in capsys.readouterr().out


def test_cli_unknown_model_is_an_error(capsys):
    assert main(["info", "vit_unknown"]) == 2
    assert "unknown model 'vit_unknown'" in capsys.readouterr().err
