"""NesT: blockify properties, parameter/MAC counts, other input sizes, local attention really is local."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitkit
from conftest import small_model
from vitkit.bench import count_macs, count_params
from vitkit.models.nest import NestAttention, blockify, unblockify


def _meta(name, **kw):
    with torch.device("meta"):
        return vitkit.create_model(name, **kw)


@pytest.mark.parametrize("h,w,bh,bw", [(8, 8, 2, 2), (12, 8, 3, 4), (6, 10, 3, 5), (4, 4, 4, 4)])
def test_unblockify_inverts_blockify(h, w, bh, bw):
    x = torch.randn(2, h, w, 5)
    blocks = blockify(x, (bh, bw))
    assert blocks.shape == (2, (h // bh) * (w // bw), bh * bw, 5)
    assert torch.equal(unblockify(blocks, (h // bh, w // bw), (bh, bw)), x)
    # block t holds exactly the pixels of grid cell (t // gw, t % gw), row-major inside
    gw = w // bw
    t = blocks.shape[1] - 1
    r, c = divmod(t, gw)
    assert torch.equal(blocks[:, t].reshape(2, bh, bw, 5), x[:, r * bh : (r + 1) * bh, c * bw : (c + 1) * bw])


@pytest.mark.parametrize(
    "name,params,gmacs",
    [  # ARCHITECTURES.md §5.2 ([computed] = timm-bench), and §5.3 MQA-adjusted CIFAR counts
        ("nest_tiny", 17.06e6, 5.81),
        ("nest_small", 38.35e6, 10.32),
        ("nest_base", 67.72e6, 17.93),
        ("nest_tiny_jx", 17.06e6, 5.81),
    ],
)
def test_imagenet_params_and_macs(name, params, gmacs):
    model = _meta(name)
    assert abs(count_params(model) - params) / params < 0.001
    assert round(count_macs(model) / 1e9, 2) == pytest.approx(gmacs, abs=0.011)


@pytest.mark.parametrize(
    "name,params", [("nest_tiny_cifar", 6.0e6), ("nest_small_cifar", 22.9e6), ("nest_base_cifar", 89.1e6)]
)
def test_cifar_params_multi_query(name, params):
    # the analytic MQA adjustment of ARCHITECTURES.md §5.3 (MHA would give 6.60M / 25.81M / 102.0M with 1000 classes)
    model = _meta(name)
    assert model.num_classes == 10
    assert abs(count_params(model) - params) / params < 0.01


def test_cifar_layout():
    model = _meta("nest_tiny_cifar")
    assert [lv.pos_embed.shape[1] for lv in model.levels] == [64, 16, 4, 1]
    assert all(lv.pos_embed.shape[2] == 16 for lv in model.levels)
    assert [f["reduction"] for f in model.feature_info] == [1, 2, 4, 8]


def test_attention_is_local_to_blocks():
    """Changing pixels inside one level-0 block leaves the level-0 output of every other block unchanged."""
    model = small_model("nest_tiny").eval()  # 32x32 input, patch 4 -> 8x8 tokens, 4x4 blocks of 2x2 tokens
    x = torch.randn(1, 3, 32, 32)
    x2 = x.clone()
    x2[:, :, :8, :8] += torch.randn(1, 3, 8, 8)  # top-left block only (2x2 tokens of 4px)
    with torch.no_grad():
        a = model.levels[0](model.patch_embed(x))
        b = model.levels[0](model.patch_embed(x2))
    changed = (a - b).abs().amax(dim=1)[0] > 1e-6  # (8, 8) token grid
    assert changed[:2, :2].all()
    changed[:2, :2] = False
    assert not changed.any()


def test_attention_projection_without_reordering_equals_the_checkpoint_order():
    """NestAttention permutes proj's weight columns instead of copying the heads to (d, heads) order: same
    output and gradients as running proj as a module (which a hook on proj forces), and a hook sees the
    checkpoint's (B, N, d, heads) input order."""
    torch.manual_seed(0)
    attn = NestAttention(24, num_heads=3)
    x = torch.randn(2, 10, 24, dtype=torch.float64, requires_grad=True)
    attn = attn.double()
    fast = attn(x)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), attn.proj.weight)
    seen = []
    handle = attn.proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    slow = attn(x)
    (g_slow,) = torch.autograd.grad(slow.square().sum(), attn.proj.weight)
    handle.remove()
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-12, atol=1e-12)
    q, k, v = attn.qkv(x).reshape(2, 10, 3, 3, 8).permute(2, 0, 3, 1, 4)
    heads_out = torch.softmax(q @ k.transpose(-2, -1) * 8**-0.5, -1) @ v  # (B, heads, N, d)
    torch.testing.assert_close(seen[0], heads_out.permute(0, 2, 3, 1).reshape(2, 10, 24))


def test_non_square_input_size():
    model = vitkit.create_model("nest_tiny", img_size=(64, 96)).eval()
    assert model.levels[0].block == (4, 6)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 96)).shape == (2, 1000)
        _, inter = model.forward_intermediates(torch.randn(1, 3, 64, 96))
    assert [tuple(t.shape[-2:]) for t in inter] == [(16, 24), (8, 12), (4, 6)]


def test_bad_sizes_name_the_multiple():
    with pytest.raises(ValueError, match="multiple of patch_size \\* 2\\^\\(num_levels-1\\) = 16"):
        vitkit.create_model("nest_tiny", img_size=200)
    model = small_model("nest_tiny")
    with pytest.raises(ValueError, match="nest_tiny: expected input size 32x32"):
        model(torch.randn(1, 3, 48, 48))


def test_checkpoint_at_other_size_resamples_block_pos_embed(tmp_path):
    src = small_model("nest_tiny")  # 32px: 2x2-token blocks
    path = vitkit.save_state_dict(src, tmp_path / "nest32.safetensors")
    dst = vitkit.create_model("nest_tiny", img_size=(48, 64), checkpoint_path=path)  # 3x4-token blocks
    assert dst.levels[0].pos_embed.shape == (1, 16, 12, 96)
    # a constant block embedding stays constant under resampling
    src2 = small_model("nest_tiny")
    with torch.no_grad():
        src2.levels[1].pos_embed.copy_(torch.ones_like(src2.levels[1].pos_embed) * 0.3)
    path2 = vitkit.save_state_dict(src2, tmp_path / "const.safetensors")
    dst2 = vitkit.create_model("nest_tiny", img_size=(48, 64), checkpoint_path=path2)
    torch.testing.assert_close(dst2.levels[1].pos_embed, torch.full((1, 4, 12, 192), 0.3))
    torch.testing.assert_close(
        dst.levels[2].transformer_encoder[0].mlp.fc1.weight, src.levels[2].transformer_encoder[0].mlp.fc1.weight
    )


def test_same_padding_differs_from_symmetric_only_in_the_pooling_windows():
    """nest_tiny_jx (TF 'SAME', for the converted JAX weights) and nest_tiny are one network but for where the
    aggregation's 3x3/2 max-pool windows sit: SAME pads only right/bottom on even maps, so its windows start one
    pixel later ([2i, 2i+2] against [2i-1, 2i+1]). Its 3x3 conv pads 1 on every side, like the symmetric one."""
    a = small_model("nest_tiny").eval()
    b = small_model("nest_tiny_jx").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ya, yb = a(x), b(x)
        fmap = torch.randn(2, 8, 8, 6)  # an even map, as NesT's always are
        inf = float("-inf")
        for level_a, level_b in zip(a.levels[1:], b.levels[1:]):
            pool_a, pool_b = level_a.pool.pool, level_b.pool.pool
            assert torch.equal(pool_a(fmap), F.max_pool2d(F.pad(fmap, (1, 1, 1, 1), value=inf), 3, 2))
            assert torch.equal(pool_b(fmap), F.max_pool2d(F.pad(fmap, (0, 1, 0, 1), value=inf), 3, 2))
            level_b.pool.pool = pool_a
        # with the symmetric windows the two models agree (to the rounding of a padded vs an implicit-padding conv)
        scale = float(ya.abs().max())
        torch.testing.assert_close(b(x), ya, rtol=1e-5, atol=1e-5 * scale)
        assert (ya - yb).abs().max() > 1e-2 * scale  # ... where the windows made a real difference
