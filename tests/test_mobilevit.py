"""MobileViT: unfold/fold properties, sizes without resampling, parameter and MAC counts."""

from __future__ import annotations

import pytest
import torch

import vitkit
from conftest import small_model
from vitkit.bench import count_macs, count_params
from vitkit.models.mobilevit import LinearSelfAttention, fold_patches, patch_sequences, unfold_patches


def _meta(name):
    with torch.device("meta"):
        return vitkit.create_model(name)


@pytest.mark.parametrize("h,w,ph,pw", [(4, 4, 2, 2), (8, 6, 2, 2), (6, 9, 3, 3), (4, 8, 2, 4)])
def test_fold_inverts_unfold_and_groups_intra_patch_positions(h, w, ph, pw):
    x = torch.randn(2, 3, h, w)
    u = unfold_patches(x, (ph, pw))
    nh, nw = h // ph, w // pw
    assert u.shape == (2, 3, ph * pw, nh * nw)
    assert torch.equal(fold_patches(u, (nh, nw), (ph, pw)), x)
    # sequence p holds pixel (p // pw, p % pw) of every patch, patches row-major
    p, n = ph * pw - 1, nh * nw - 1
    r, c = divmod(n, nw)
    assert torch.equal(u[:, :, p, n], x[:, :, r * ph + p // pw, c * pw + p % pw])


def test_unfold_fold_export_with_at_most_4d_tensors():
    class Roundtrip(torch.nn.Module):
        def forward(self, x):
            return fold_patches(unfold_patches(x, (2, 2)), (4, 4), (2, 2))

    ep = torch.export.export(Roundtrip(), (torch.randn(1, 8, 8, 8),))
    ranks = [len(n.meta["val"].shape) for n in ep.graph.nodes if "val" in n.meta and hasattr(n.meta["val"], "shape")]
    assert max(ranks) <= 4


@pytest.mark.parametrize(
    "batch,h,w,ph,pw", [(1, 8, 8, 2, 2), (2, 12, 6, 2, 3), (3, 6, 9, 3, 3), (1, 16, 8, 4, 2), (1, 4, 2, 2, 2)]
)
def test_patch_sequences_are_the_unfolded_patches_in_a_fresh_row_major_buffer(batch, h, w, ph, pw):
    """The transformer's input: one sequence per image and pixel place, the same values as the unfolded patches
    permuted, and a new row-major buffer at every batch size (batch 1 included, where the other order ends in a view
    whose rows are channel planes), written with at most 4-D tensors."""
    x = torch.randn(batch, 5, h, w)
    got = patch_sequences(x, (ph, pw))
    P, N = ph * pw, (h // ph) * (w // pw)
    assert torch.equal(got, unfold_patches(x, (ph, pw)).permute(0, 2, 3, 1).reshape(batch * P, N, 5))
    assert got.is_contiguous() and got.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()

    class Sequences(torch.nn.Module):
        def forward(self, x):
            return patch_sequences(x, (ph, pw))

    ep = torch.export.export(Sequences(), (x,))
    assert max(len(n.meta["val"].shape) for n in ep.graph.nodes if hasattr(n.meta.get("val"), "shape")) <= 4


@pytest.mark.parametrize(
    "name,params,gmacs",
    [  # ARCHITECTURES.md §4.2 (exact timm counts) and §4.5 (v2 GMACs at 256)
        ("mobilevit_xxs", 1_272_024, 0.41),
        ("mobilevit_xs", 2_317_848, 1.03),
        ("mobilevit_s", 5_578_632, 2.00),
        ("mobilevitv2_050", 1.4e6, 0.47),
        ("mobilevitv2_100", 4.9e6, 1.81),
        ("mobilevitv2_200", 18.4e6, 7.16),
    ],
)
def test_params_and_macs(name, params, gmacs):
    model = _meta(name)
    p = count_params(model)
    if isinstance(params, int):
        assert p == params
    else:
        assert abs(p - params) / params < 0.04  # the paper rounds to 0.1M
    assert round(count_macs(model) / 1e9, 2) == pytest.approx(gmacs, abs=0.011)


@pytest.mark.parametrize("size", [160, 192, 256, 320])
def test_sizes_divisible_by_32(size):
    model = small_model("mobilevit_xxs").eval()
    with torch.no_grad():
        final, maps = model.forward_intermediates(torch.randn(1, 3, size, size))
        assert model(torch.randn(1, 3, size, size)).shape == (1, 1000)
    assert [m.shape[-1] for m in maps] == [size // r for r in (2, 4, 8, 16, 32)]
    assert final.shape == (1, 320, size // 32, size // 32)


def test_odd_sizes_follow_the_resize_rule_and_tiny_inputs_fail():
    model = small_model("mobilevit_xs").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 100, 136)).shape == (1, 1000)
    with pytest.raises(ValueError, match="mobilevit_xs: input sides must be at least 32 pixels"):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match="expected 3 input channels"):
        model(torch.randn(1, 4, 64, 64))


def test_separable_attention_is_linear_in_tokens_and_matches_formula():
    torch.manual_seed(0)
    attn = LinearSelfAttention(8).eval()
    x = torch.randn(1, 8, 4, 10)
    with torch.no_grad():
        out = attn(x)
        q, k, v = attn.qkv_proj(x).split([1, 8, 8], dim=1)
        cs = q.softmax(-1)  # context scores over the 10 patches
        cv = (cs * k).sum(-1, keepdim=True)
        ref = attn.out_proj(torch.relu(v) * cv)
    torch.testing.assert_close(out, ref)


def test_mobilevit_block_sees_the_whole_map():
    """After one MobileViT block, every output pixel depends on every input pixel (global receptive field)."""
    model = small_model("mobilevit_xxs").eval()
    block = model.stages[2][1]
    x = torch.randn(1, 48, 8, 8, requires_grad=True)
    block(x)[0, :, 0, 0].sum().backward()
    assert (x.grad.abs().sum(1)[0] > 0).all()
