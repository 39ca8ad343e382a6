"""Axial family: Axial-ViT (row then column attention blocks) and Axial-ResNet (position-sensitive axial
attention in ResNet bottlenecks): parameter counts against their sources, and what axial attention computes."""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.bench import count_macs, count_params
from vitkit.models.axial import AXIAL_VIT_VARIANTS, AxialBlock, PositionSensitiveAxialAttention


def _meta(name, **kw):
    with torch.device("meta"):
        return vitkit.create_model(name, **kw)


def _axial_vit_closed_form(name: str) -> tuple[int, int]:
    """ViT's closed form (ARCHITECTURES.md §1.2) with every block doubled (a row block and a column block), no class
    token (N patch embeddings), a pooled-vector LayerNorm; MACs: 24 N D^2 per axial block plus the row and column
    attention matmuls 2 N D (H + W), the patch projection and the head."""
    patch, d, depth, _ = AXIAL_VIT_VARIANTS[name]
    k, side = 1000, 224 // patch
    n = side * side
    params = depth * 2 * (12 * d * d + 13 * d) + (3 * patch * patch * d + d) + n * d + 2 * d + (d * k + k)
    macs = depth * (24 * n * d * d + 2 * n * d * (side + side)) + n * 3 * patch * patch * d + d * k
    return params, macs


@pytest.mark.parametrize("name", sorted(AXIAL_VIT_VARIANTS))
def test_axial_vit_params_closed_form(name):
    assert count_params(_meta(name)) == _axial_vit_closed_form(name)[0]


@pytest.mark.slow  # a MAC count takes seconds
@pytest.mark.parametrize("name", sorted(AXIAL_VIT_VARIANTS))
def test_axial_vit_macs_closed_form(name):
    assert count_macs(_meta(name)) == _axial_vit_closed_form(name)[1]


@pytest.mark.slow
@pytest.mark.parametrize("patch", [16, 32])
def test_axial_vit_costs_more_than_vit_at_the_same_size(patch):
    """The paper's finding on cost: Axial-ViT-B is larger and slower than ViT-B (two blocks for one)."""
    vit, axial = _meta(f"vit_base_patch{patch}_224"), _meta(f"axial_vit_base_patch{patch}_224")
    assert count_params(axial) > 1.9 * count_params(vit)
    assert count_macs(axial) > 1.9 * count_macs(vit)


def _attn_layer_params(c: int, span: int, heads: int = 8) -> int:
    """One position-sensitive axial layer of width c: qkv 1x1 (c -> 2c, no bias), BatchNorms on q/k/v (2c), on the
    3 logit terms per head, on the 2 output terms (2c), and the shared relative table (2c/heads x (2 span - 1))."""
    return 2 * c * c + 2 * (2 * c) + 2 * (3 * heads) + 2 * (2 * c) + (2 * c // heads) * (2 * span - 1)


def test_axial_resnet50_is_resnet50_with_its_3x3_convs_replaced():
    """torchvision's ResNet-50 has 25,557,032 parameters; each bottleneck's 3x3 conv and its BatchNorm (9c^2 + 2c)
    become a height and a width attention layer spanning the map the block attends over at 224 px."""
    expected = 25_557_032
    maps = 56
    for stage, (blocks, c) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for j in range(blocks):
            expected += -(9 * c * c + 2 * c) + 2 * _attn_layer_params(c, maps)
            if stage > 0 and j == 0:
                maps //= 2  # a strided block attends at its input size, then pools
    assert count_params(_meta("axial_resnet50")) == expected


def test_axial_resnet26s_matches_the_reference_release():
    """csrhddlam/axial-deeplab README: Axial-ResNet-26-S has 5.9M parameters (rounded to 0.1M)."""
    assert abs(count_params(_meta("axial_resnet26s")) - 5.9e6) <= 0.05e6


def _plain_block(blk, x):
    """A pre-norm ViT block written out: LN -> qkv -> softmax(q k^T / sqrt(d)) v -> proj, then LN -> MLP."""
    a = blk.attn
    b, n, c = x.shape
    h = torch.nn.functional.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    q, k, v = (h @ a.qkv.weight.T + a.qkv.bias).reshape(b, n, 3, a.num_heads, c // a.num_heads).unbind(2)
    att = torch.einsum("bihd,bjhd->bhij", q, k) / (c // a.num_heads) ** 0.5
    o = torch.einsum("bhij,bjhd->bihd", att.softmax(-1), v).reshape(b, n, c)
    x = x + o @ a.proj.weight.T + a.proj.bias
    h = torch.nn.functional.layer_norm(x, (c,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    h = torch.nn.functional.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
    return x + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias


def _axial_block():
    torch.manual_seed(0)
    return AxialBlock(16, 2, 2.0, True, 0.0, 0.0, 0.0, torch.nn.LayerNorm).eval()


def test_axial_block_equals_rows_then_columns_computed_plainly():
    blk = _axial_block()
    x = torch.randn(2, 3, 5, 16)  # (B, H, W, C): 3 rows of 5 tokens
    ref = torch.stack([_plain_block(blk.row, x[:, y]) for y in range(3)], dim=1)
    ref = torch.stack([_plain_block(blk.col, ref[:, :, c]) for c in range(5)], dim=2)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


def test_row_attention_mixes_within_a_row_and_column_attention_within_a_column():
    blk = _axial_block()
    x = torch.randn(1, 4, 5, 16)
    x2 = x.clone()
    x2[0, 2, 3] += torch.randn(16)  # perturb the token at row 2, column 3 (not by a constant: LayerNorm removes it)
    with torch.no_grad():
        row = (blk.row_step(x2) - blk.row_step(x)).abs().amax(-1)[0] > 1e-6  # (H, W): which tokens changed
        col = (blk.col_step(x2) - blk.col_step(x)).abs().amax(-1)[0] > 1e-6
        both = (blk(x2) - blk(x)).abs().amax(-1)[0] > 1e-6
    rows, cols = torch.arange(4)[:, None].expand(4, 5), torch.arange(5)[None].expand(4, 5)
    assert torch.equal(row, rows == 2) and torch.equal(col, cols == 3)
    assert both.all()  # a row step then a column step: every token sees every other


def _ps_attn(axis="height", span=8, seed=0):
    torch.manual_seed(seed)
    m = PositionSensitiveAxialAttention(16, num_heads=2, span=span, axis=axis).eval()
    with torch.no_grad():  # BatchNorm statistics and affine away from the identity, so they matter
        for bn in (m.bn_qkv, m.bn_logits, m.bn_out):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m


@pytest.mark.parametrize("axis", ["height", "width"])
def test_position_sensitive_attention_stays_on_its_axis(axis):
    m = _ps_attn(axis)
    x = torch.randn(1, 16, 6, 7)
    x2 = x.clone()
    x2[0, :, 2, 4] += 1.0
    with torch.no_grad():
        changed = (m(x2) - m(x)).abs().amax(1)[0] > 1e-6  # (H, W)
    rows, cols = torch.arange(6)[:, None].expand(6, 7), torch.arange(7)[None].expand(6, 7)
    assert torch.equal(changed, cols == 4 if axis == "height" else rows == 2)


def test_position_sensitive_attention_equals_the_formula_written_plainly():
    """y_o = sum_p softmax_p(BN(q_o.k_p) + BN(q_o.r^q_{p-o}) + BN(k_p.r^k_{p-o})) * BN(v_p) + BN(r^v_{p-o}) terms, one
    column (height axis) at a time, with the BatchNorms in eval mode as per-channel affine maps."""
    m = _ps_attn("height", span=5)
    x = torch.randn(2, 16, 5, 3)
    with torch.no_grad():
        out = m(x)

    def bn(t, layer, ch):  # eval-mode BatchNorm of channel ch
        return (t - layer.running_mean[ch]) / (layer.running_var[ch] + layer.eps).sqrt() * layer.weight[
            ch
        ] + layer.bias[ch]

    heads, c = 2, 8  # value width per head; queries and keys have 4
    ref = torch.zeros_like(out)
    with torch.no_grad():
        for b in range(2):
            for col in range(3):
                seq = x[b, :, :, col]  # (C, L)
                qkv = m.qkv.weight[:, :, 0] @ seq  # (2C, L)
                qkv = torch.stack([bn(qkv[i], m.bn_qkv, i) for i in range(32)])
                for h in range(heads):
                    base = h * 2 * c
                    q, k, v = qkv[base : base + 4], qkv[base + 4 : base + 8], qkv[base + 8 : base + 16]
                    for o in range(5):
                        logits = []
                        for p in range(5):
                            r = m.relative[:, p - o + 4]  # the offset p - o
                            qk, qr, kr = q[:, o] @ k[:, p], q[:, o] @ r[:4], k[:, p] @ r[4:8]
                            logits.append(
                                bn(qk, m.bn_logits, h) + bn(qr, m.bn_logits, 2 + h) + bn(kr, m.bn_logits, 4 + h)
                            )
                        w = torch.stack(logits).softmax(0)
                        sv = sum(w[p] * v[:, p] for p in range(5))
                        sr = sum(w[p] * m.relative[8:, p - o + 4] for p in range(5))
                        for j in range(c):
                            ch = h * c + j
                            ref[b, ch, o, col] = bn(sv[j], m.bn_out, 2 * ch) + bn(sr[j], m.bn_out, 2 * ch + 1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_position_sensitive_logits_are_translation_equivariant_along_the_axis():
    """Content shifted by s along a longer axis: its three logit terms among themselves are unchanged (they depend
    on the offset p - o only), and the relative terms do depend on it."""
    m = _ps_attn("height", span=12)
    content = torch.randn(1, 16, 6)
    a = torch.cat([content, torch.randn(1, 16, 6)], dim=2)
    b = torch.cat([torch.randn(1, 16, 3), content, torch.randn(1, 16, 3)], dim=2)
    with torch.no_grad():
        ta, _ = m.logits(a)  # (1, 3, heads, 12, 12)
        tb, _ = m.logits(b)
    torch.testing.assert_close(tb[..., 3:9, 3:9], ta[..., :6, :6])
    assert not torch.allclose(ta[0, 1, :, 0, 1], ta[0, 1, :, 0, 2])  # q.r^q changes with the offset


def test_axial_resnet_runs_at_other_sizes_with_clipped_offsets():
    torch.manual_seed(0)
    model = vitkit.create_model("axial_resnet26s", img_size=64, num_classes=3).eval()
    with torch.no_grad():
        small, big = model(torch.randn(1, 3, 64, 64)), model(torch.randn(1, 3, 96, 64))
    assert small.shape == big.shape == (1, 3) and torch.isfinite(big).all()
    with pytest.raises(ValueError, match=r"^axial_resnet26s: img_size=80: each side must be a multiple of .* = 32"):
        vitkit.create_model("axial_resnet26s", img_size=80)
