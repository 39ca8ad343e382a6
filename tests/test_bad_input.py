"""Mistakes at the model boundary get an error that names the model, what was given and what works instead."""

from __future__ import annotations

import pytest
import torch

import vitkit
from conftest import HEAVY_DEFAULT, ONE_PER_FAMILY, input_size_for, slow_except, small_model


@pytest.mark.parametrize("name", slow_except(ONE_PER_FAMILY, HEAVY_DEFAULT))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_pixels_are_refused_with_what_to_do(name, dtype):
    model = small_model(name).eval()
    x = torch.randint(0, 256, (1, *input_size_for(name))).to(dtype)
    mean, std = model.data_config["mean"], model.data_config["std"]
    for forward in (model, model.forward_features, lambda t: model.forward_intermediates(t, indices=1)):
        with torch.no_grad(), pytest.raises(ValueError) as e:
            forward(x)
        msg = str(e.value)
        assert msg.startswith(f"{name}: expected a floating-point image batch, got dtype {dtype}; "), msg
        assert "x.float() / 255" in msg and f"mean={tuple(mean)}, std={tuple(std)}" in msg
        assert "EvalTransform.from_data_config(model.data_config)" in msg


@pytest.mark.parametrize("name", slow_except(ONE_PER_FAMILY, HEAVY_DEFAULT))
def test_float64_input_needs_float64_weights(name):
    model = small_model(name).eval()
    x = torch.randn(1, *input_size_for(name), dtype=torch.float64)
    with torch.no_grad(), pytest.raises(ValueError) as e:
        model(x)
    assert str(e.value) == (
        f"{name}: input dtype torch.float64 does not match the model's torch.float32 weights; "
        "pass x.to(torch.float32) (or convert the model with .to(dtype))"
    )
    with torch.no_grad():
        assert torch.isfinite(model.double()(x)).all()  # a float64 model takes it


def test_features_only_backbone_checks_the_dtype_too():
    c, h, w = input_size_for("nest_tiny")
    backbone = vitkit.create_model("nest_tiny", img_size=(h, w), features_only=True).eval()
    with pytest.raises(ValueError, match="^nest_tiny: expected a floating-point image batch, got dtype torch.uint8"):
        backbone(torch.zeros(1, c, h, w, dtype=torch.uint8))


@pytest.mark.parametrize("name", ["nest_tiny", "lavit_tiny"])
def test_families_sized_by_img_size_suggest_a_model_built_for_the_input(name):
    """NesT and LaViT take no dynamic_img_size: the error suggests img_size, and that suggestion works."""
    c, h, w = input_size_for(name)
    model = small_model(name).eval()
    x = torch.randn(1, c, 2 * h, 3 * w)
    with torch.no_grad(), pytest.raises(ValueError) as e:
        model(x)
    msg = str(e.value)
    assert msg.startswith(f"{name}: expected input size {h}x{w} (img_size), got {2 * h}x{3 * w}; ")
    assert f"create the model with img_size=({2 * h}, {3 * w})" in msg and "dynamic_img_size" not in msg
    with pytest.raises(ValueError, match="dynamic_img_size"):  # the reason it must not be suggested
        vitkit.create_model(name, img_size=(h, w), dynamic_img_size=True)
    with torch.no_grad():
        assert vitkit.create_model(name, img_size=(2 * h, 3 * w)).eval()(x).shape == (1, 1000)


def test_sizes_the_family_cannot_build_suggest_one_it_can():
    model = small_model("nest_tiny").eval()  # 32 px; sides must be multiples of 16
    with pytest.raises(ValueError) as e:
        model(torch.randn(1, 3, 40, 56))
    msg = str(e.value)
    assert "img_size=(40, 56)" not in msg and "dynamic_img_size" not in msg
    assert "an img_size whose sides are multiples of 16x16 (e.g. img_size=(32, 48))" in msg
    vitkit.create_model("nest_tiny", img_size=(32, 48))  # the example builds


def test_vit_suggests_img_size_and_dynamic_img_size():
    model = small_model("vit_tiny_patch16_224").eval()  # 64 px
    x = torch.randn(1, 3, 48, 80)
    with pytest.raises(ValueError) as e:
        model(x)
    msg = str(e.value)
    assert "create the model with img_size=(48, 80)" in msg
    assert "or with dynamic_img_size=True (any multiple of 16x16)" in msg
    dynamic = vitkit.create_model("vit_tiny_patch16_224", img_size=64, dynamic_img_size=True).eval()
    with torch.no_grad():
        assert dynamic(x).shape == (1, 1000)


@pytest.mark.parametrize("bad", [-1, -1000, 2.5, True, "10"])
def test_num_classes_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError) as e:
        vitkit.create_model("vit_tiny_patch16_224", img_size=32, num_classes=bad)
    assert str(e.value) == (
        "vit_tiny_patch16_224: num_classes must be an int >= 0 (0: no classifier, forward gives pooled features), "
        f"got {bad!r}"
    )


def test_num_classes_zero_means_no_classifier():
    model = vitkit.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_into_fp32_weights_is_named_unless_autocast(dtype):
    model = small_model("nest_tiny").eval()
    x = torch.randn(1, *input_size_for("nest_tiny")).to(dtype)
    with torch.no_grad(), pytest.raises(ValueError, match=f"input dtype {dtype} does not match the model's"):
        model(x)
    if dtype == torch.bfloat16:  # under autocast the model casts as it goes
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(x).float()).all()
        with torch.no_grad():
            assert model.to(dtype)(x).dtype == dtype  # a bf16 model takes it
