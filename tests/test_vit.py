"""ViT family: parameter counts, MACs, attention paths, position-embedding resampling, input checks."""

from __future__ import annotations

import pytest
import torch

import vitkit
from conftest import small_model
from vitkit.bench import count_macs, count_params
from vitkit.layers import Attention, resample_abs_pos_embed, use_fused_attn
from vitkit.models.vit import VIT_VARIANTS


def _meta(name, **kw):
    with torch.device("meta"):
        return vitkit.create_model(name, **kw)


@pytest.mark.parametrize("name", sorted(VIT_VARIANTS))
def test_param_count_closed_form(name):
    """ARCHITECTURES.md §1.2: L(12D^2 + 13D) + (3P^2 D + D) + N D + D + 2D + (D K + K), with a 1000-class head."""
    patch, d, depth, _, img = VIT_VARIANTS[name]
    k = 1000
    n = (img // patch) ** 2 + 1
    expected = depth * (12 * d * d + 13 * d) + (3 * patch * patch * d + d) + n * d + d + 2 * d + (d * k + k)
    assert count_params(_meta(name, num_classes=k)) == expected


@pytest.mark.parametrize(
    "name,params,gmacs",
    [  # ARCHITECTURES.md §1.3 and §1.6 (timm counts; headless where timm's default weights are)
        ("vit_tiny_patch16_224", 5.72e6, 1.254),
        ("vit_small_patch16_224", 22.05e6, 4.599),
        ("vit_small_patch32_224", 22.88e6, 1.143),
        ("vit_base_patch16_224", 86_567_656, 17.564),
        ("vit_base_patch32_224", 88.22e6, 4.409),
        ("vit_large_patch16_224", 304.33e6, 61.56),
        ("vit_large_patch32_224", 305.51e6, 15.38),
        ("vit_large_patch14_224", 304.20e6, 81.01),
        ("vit_huge_patch14_224", 630.77e6, 167.29),
        ("vit_base_patch16_384", 86.86e6, 55.48),
        ("vit_base_r50_s16_224", 97.89e6, 21.54),
        ("vit_base_r50_s16_384", 98.95e6, 67.16),
        ("vit_small_r26_s32_224", 36.43e6, 3.46),
        ("vit_large_r50_s32_224", 328.99e6, 19.41),
        ("vit_tiny_r_s16_p8_224", 6.34e6, 0.43),
    ],
)
def test_params_and_macs_match_reference(name, params, gmacs):
    model = _meta(name)
    p = count_params(model)
    if isinstance(params, int):
        assert p == params
    else:
        assert abs(p - params) / params < 0.001, p
    decimals = len(str(gmacs).split(".")[1])  # the reference is rounded to these decimals
    assert round(count_macs(model) / 1e9, decimals) == pytest.approx(gmacs, abs=1.01 * 10**-decimals)


@pytest.mark.parametrize("shape", [(2, 17, 96), (1, 50, 64)])
def test_fused_equals_eager_attention(shape):
    torch.manual_seed(0)
    attn = Attention(shape[-1], num_heads=4).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        with use_fused_attn(True):
            fused = attn(x)
        with use_fused_attn(False):
            eager = attn(x)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)


def test_fused_equals_eager_whole_model_and_switch_restores():
    model = small_model("vit_small_patch16_224").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = model(x)
        with use_fused_attn(False):
            eager = model(x)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)
    assert vitkit.layers.fused_attn() is True


def test_eager_path_exposes_attention_probabilities():
    model = small_model("vit_tiny_patch16_224").eval()
    probs = []
    handle = model.blocks[0].attn.attn_probs.register_forward_hook(lambda m, i, o: probs.append(o))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))  # fused: the hook never fires
        assert probs == []
        with use_fused_attn(False):
            model(torch.randn(1, 3, 64, 64))
    handle.remove()
    (p,) = probs
    assert p.shape == (1, 3, 17, 17)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 3, 17))


def test_resample_to_own_grid_is_identity():
    pe = torch.randn(1, 1 + 14 * 14, 32)
    assert torch.equal(resample_abs_pos_embed(pe, (14, 14), num_prefix_tokens=1), pe)
    pe2 = torch.randn(1, 6 * 9, 8)
    assert torch.equal(resample_abs_pos_embed(pe2, (6, 9), old_size=(6, 9), num_prefix_tokens=0), pe2)


def test_resample_keeps_prefix_and_preserves_smooth_fields():
    # a linear ramp over the grid stays (almost) a ramp after bicubic resampling; the class token is untouched
    g = torch.linspace(-1, 1, 8)
    field = (g[:, None] + 2 * g[None, :]).reshape(1, 64, 1).repeat(1, 1, 4)
    cls = torch.randn(1, 1, 4)
    out = resample_abs_pos_embed(torch.cat([cls, field], 1), (12, 12), num_prefix_tokens=1)
    assert out.shape == (1, 145, 4)
    assert torch.equal(out[:, :1], cls)
    grid = out[0, 1:, 0].reshape(12, 12)
    assert (grid.diff(dim=1) > 0).all() and (grid.diff(dim=0) > 0).all()  # monotone like the ramp


def test_checkpoint_from_other_resolution_resamples_pos_embed(tmp_path):
    src = small_model("vit_tiny_patch16_224")  # 64x64 -> 4x4 grid
    path = vitkit.save_state_dict(src, tmp_path / "vit64.safetensors")
    dst = vitkit.create_model("vit_tiny_patch16_224", img_size=96, checkpoint_path=path)
    assert dst.pos_embed.shape == (1, 1 + 36, 192)
    expected = resample_abs_pos_embed(src.pos_embed.detach(), (6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(dst.pos_embed.detach(), expected)
    torch.testing.assert_close(dst.blocks[3].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)


def test_dynamic_img_size_accepts_other_sizes_and_matches_fixed_at_native():
    model = small_model("vit_tiny_patch16_224", dynamic_img_size=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 80)).shape == (1, 1000)
        fixed = vitkit.create_model("vit_tiny_patch16_224", img_size=64).eval()
        fixed.load_state_dict(model.state_dict())
        x = torch.randn(2, 3, 64, 64)
        assert torch.equal(model(x), fixed(x))
        _, inter = model.forward_intermediates(torch.randn(1, 3, 48, 80), indices=1)
    assert inter[0].shape == (1, 192, 3, 5)
    with pytest.raises(ValueError, match="multiples of 16x16"):
        model(torch.randn(1, 3, 50, 64))


def test_hybrid_uses_resnet_stem_at_stride_16():
    model = small_model("vit_base_r50_s16_224")
    assert model.patch_embed.reduction == (16, 16)
    assert len(model.patch_embed.backbone.stages) == 3
    assert [len(s.blocks) for s in model.patch_embed.backbone.stages] == [3, 4, 9]
    # weight standardisation: the conv output does not change when the raw filters are affinely rescaled
    conv = model.patch_embed.backbone.stem.conv
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = conv(x)
        conv.weight.mul_(3.0).add_(0.5)
        torch.testing.assert_close(conv(x), y, rtol=1e-4, atol=1e-4)


# ---- bad input: each raises a clear error naming the model and what was expected -------------


def test_wrong_channel_count():
    model = small_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224: expected 3 input channels .* got 1"):
        model(torch.randn(1, 1, 64, 64))


def test_size_not_divisible_by_patch():
    model = small_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224: expected input size 64x64 .* got 70x70"):
        model(torch.randn(1, 3, 70, 70))


def test_fixed_size_model_rejects_other_sizes_with_hint():
    model = small_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        model(torch.randn(1, 3, 96, 96))


def test_not_an_image_batch():
    model = small_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="4-D NCHW"):
        model(torch.randn(3, 64, 64))


def test_unknown_model_name_suggests():
    with pytest.raises(ValueError, match=r"unknown model 'vit_tiny_patch16_244'; did you mean vit_tiny_patch16_224"):
        vitkit.create_model("vit_tiny_patch16_244")


def test_unknown_argument_names_model():
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224: invalid argument .*no_such_arg"):
        vitkit.create_model("vit_tiny_patch16_224", no_such_arg=3)


def test_in_chans_one():
    model = small_model("vit_tiny_patch16_224", in_chans=1)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 1000)
    assert vitkit.resolve_data_config(model)["input_size"] == (1, 64, 64)
