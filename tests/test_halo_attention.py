"""HaloAttention against a naive masked global attention, in float64, plus gradcheck and masking rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitkit.layers import HaloAttention, use_fused_attn


def naive_halo(layer: HaloAttention, x: torch.Tensor, mask_padding: str | None = None) -> torch.Tensor:
    """Full attention over the whole padded map; each query may see exactly the keys of its block's window.

    Written from the definition, independently of the layer's blocking: query at (qy, qx) (full-resolution
    position; strided layers take every s-th pixel) belongs to block (qy // b, qx // b); the window of that
    block spans rows [by*b - h, by*b + b + h) and the same for columns. Keys come from the map zero-padded to
    [-h, Hp + h) x [-h, Wp + h) (Hp, Wp: H, W rounded up to a multiple of b). Which of them take part:
    ``mask_padding='all'``: only keys inside the image; ``'size'``: all but those in the size padding (rows
    H..Hp-1 or columns W..Wp-1), so zero halo keys beyond the border take part; ``'none'``: all (no mask).
    Default: the layer's rule. Relative logit: q.height_rel[ky - iy + win - 1] + q.width_rel[kx - ix + win - 1]
    with (ky, kx) the key's position in the window and (iy, ix) the query's position in its (strided) block.
    """
    mask_padding = mask_padding or layer.mask_padding
    B, C, H, W = x.shape
    b, h, s, win = layer.block_size, layer.halo_size, layer.block_stride, layer.win_size
    heads, dqk, dv = layer.num_heads, layer.dim_head_qk, layer.dim_head_v
    q_all = layer.q.weight[:, :, 0, 0]
    kv_w = layer.kv.weight[:, :, 0, 0]
    Hp, Wp = math.ceil(H / b) * b, math.ceil(W / b) * b
    xp = F.pad(x, (h, Wp - W + h, h, Hp - H + h))  # keys at image rows -h .. Hp + h - 1 (same for columns)
    He, We = xp.shape[-2:]
    xf = xp.permute(0, 2, 3, 1).reshape(B, He * We, C)
    kv = (xf @ kv_w.T).reshape(B, He * We, heads, dqk + dv)
    k, v = kv[..., :dqk], kv[..., dqk:]
    ky_all = torch.arange(He).repeat_interleave(We) - h  # image coordinates of every key
    kx_all = torch.arange(We).repeat(He) - h
    inside = (ky_all >= 0) & (ky_all < H) & (kx_all >= 0) & (kx_all < W)
    in_size_padding = ((ky_all >= H) & (ky_all < Hp)) | ((kx_all >= W) & (kx_all < Wp))
    valid = {"all": inside, "size": ~in_size_padding, "none": torch.ones_like(inside)}[mask_padding]
    Ho, Wo = math.ceil(H / s), math.ceil(W / s)
    out = torch.zeros(B, heads * dv, Ho, Wo, dtype=x.dtype)
    for oy in range(Ho):
        for ox in range(Wo):
            qy, qx = oy * s, ox * s
            by, bx = qy // b, qx // b
            iy, ix = (qy - by * b) // s, (qx - bx * b) // s
            wy = ky_all - (by * b - h)  # key position inside the window
            wx = kx_all - (bx * b - h)
            allowed = (wy >= 0) & (wy < win) & (wx >= 0) & (wx < win) & valid
            q = (x[:, :, qy, qx] @ q_all.T).reshape(B, heads, dqk)
            for hd in range(heads):
                logits = (k[:, :, hd] @ q[:, hd, :, None])[..., 0] * layer.scale  # (B, HeWe)
                rel_h = layer.pos_embed.height_rel[(wy - iy + win - 1).clamp(0, 2 * win - 2)] @ q[:, hd].T
                rel_w = layer.pos_embed.width_rel[(wx - ix + win - 1).clamp(0, 2 * win - 2)] @ q[:, hd].T
                logits = logits + (rel_h + rel_w).T
                logits = logits.masked_fill(~allowed, float("-inf"))
                out[:, hd * dv : (hd + 1) * dv, oy, ox] = (logits.softmax(-1)[:, :, None] * v[:, :, hd]).sum(1)
    return out


CASES = [  # (H, W, block, halo, stride, heads, dim, dim_out)
    (8, 8, 4, 1, 1, 2, 8, 8),
    (8, 12, 4, 2, 1, 1, 4, 8),  # non-square, wider values than qk
    (10, 7, 4, 1, 1, 2, 8, 8),  # sizes that need padding
    (8, 8, 4, 1, 2, 2, 8, 8),  # strided queries
    (12, 10, 4, 2, 2, 4, 8, 16),  # strided + padding
    (6, 6, 2, 0, 1, 2, 4, 4),  # no halo: pure blocked attention
    (9, 9, 3, 3, 1, 1, 4, 4),  # halo as large as the block
]


@pytest.mark.parametrize("H,W,b,h,s,heads,dim,dim_out", CASES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mask_padding", ["all", "size"])
def test_equals_naive_masked_global_attention(H, W, b, h, s, heads, dim, dim_out, fused, mask_padding):
    torch.manual_seed(0)
    layer = HaloAttention(dim, dim_out, stride=s, num_heads=heads, block_size=b, halo_size=h, mask_padding=mask_padding)
    layer = layer.double().eval()
    layer.fused_attn = fused
    x = torch.randn(2, dim, H, W, dtype=torch.float64)
    with torch.no_grad():
        ours = layer(x)
        ref = naive_halo(layer, x)
    assert ours.shape == ref.shape == (2, dim_out, math.ceil(H / s), math.ceil(W / s))
    assert (ours - ref).abs().max() < 1e-5


def test_size_mode_equals_all_mode_away_from_borders_and_reference_rule_at_borders():
    torch.manual_seed(1)
    a = HaloAttention(8, num_heads=2, block_size=4, halo_size=2, mask_padding="all").double().eval()
    z = HaloAttention(8, num_heads=2, block_size=4, halo_size=2, mask_padding="size").double().eval()
    z.load_state_dict(a.state_dict())
    x = torch.randn(1, 8, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ya, yz = a(x), z(x)
    # interior blocks never see the border: identical; border blocks differ (zero halo keys take part in 'size')
    torch.testing.assert_close(ya[..., 4:12, 4:12], yz[..., 4:12, 4:12])
    assert not torch.allclose(ya[..., :4, :4], yz[..., :4, :4])


@pytest.mark.parametrize("fused", [True, False])
def test_size_padding_is_masked_as_in_the_naive_reference(fused):
    """mask_padding='size' on a map that needs size padding (10x7 in 4x4 blocks): the layer equals the naive
    attention without the size-padding keys, not the one with them (so the mask is what makes it right), and no
    key of the padding gets any probability."""
    torch.manual_seed(2)
    layer = HaloAttention(8, num_heads=2, block_size=4, halo_size=1).double().eval()
    layer.fused_attn = fused
    x = torch.randn(1, 8, 10, 7, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        masked, unmasked = naive_halo(layer, x, "size"), naive_halo(layer, x, "none")
    assert y.shape == masked.shape == (1, 8, 10, 7)
    assert (y - masked).abs().max() < 1e-10
    assert (y - unmasked).abs().max() > 1e-3  # the padding keys would have mattered
    if not fused:  # the eager path exposes the probabilities: windows of blocks on the padded border
        probs = []
        layer.attn_probs.register_forward_hook(lambda m, i, o: probs.append(o))
        with torch.no_grad():
            layer(x)
        keys = torch.zeros(12 + 2, 8 + 2, dtype=torch.bool)  # the padded map with its halo, True: size padding
        keys[1 + 10 : 1 + 12] = True
        keys[:, 1 + 7 : 1 + 8] = True
        windows = keys.unfold(0, 6, 4).unfold(1, 6, 4).reshape(-1, 36)  # (blocks, win*win)
        padding = windows[None, :, None, :].expand_as(probs[0])  # probs: (B*heads, blocks, queries, win*win)
        assert padding.any() and probs[0][padding].abs().max() == 0


def test_gradcheck_float64():
    torch.manual_seed(3)
    layer = HaloAttention(4, 8, stride=2, num_heads=2, block_size=4, halo_size=1, mask_padding="all").double()
    layer.fused_attn = False
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)
    layer.fused_attn = True
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)


def test_eager_probabilities_are_captured_and_sum_to_one():
    layer = HaloAttention(8, num_heads=2, block_size=4, halo_size=1).eval()
    probs = []
    layer.attn_probs.register_forward_hook(lambda m, i, o: probs.append(o))
    with torch.no_grad(), use_fused_attn(False):
        layer(torch.randn(1, 8, 8, 8))
    assert probs[0].shape == (2, 4, 16, 36)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 4, 16))


def test_bad_arguments():
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        HaloAttention(8, stride=3)
    with pytest.raises(ValueError, match="mask_padding must be one of"):
        HaloAttention(8, mask_padding="none")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        HaloAttention(12, num_heads=8)


@pytest.mark.parametrize(  # stride-1 and strided (smaller query block); the larger windows in the slow run
    "block,win", [pytest.param(4, 6, marks=pytest.mark.slow), pytest.param(2, 6, marks=pytest.mark.slow), (3, 3)]
)
def test_relative_logits_gradcheck_for_queries_and_both_tables(block, win):
    """The relative logits' gradients for q and both tables (the table rows are gathered by relative offset)."""
    from vitkit.layers.halo_attention import PosEmbedRel

    torch.manual_seed(0)
    pos = PosEmbedRel(block, win, 5, 0.5).double()
    q = torch.randn(2, 3, block * block, 5, dtype=torch.float64, requires_grad=True)

    def logits(q, height, width):
        return torch.func.functional_call(pos, {"height_rel": height, "width_rel": width}, (q,))

    tables = (pos.height_rel.detach().requires_grad_(), pos.width_rel.detach().requires_grad_())
    assert torch.autograd.gradcheck(logits, (q, *tables), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim,stride,size", [(48, 1, (12, 16)), (48, 2, (16, 12)), (96, 1, (8, 8))])
def test_bf16_paths_match_fp32(dim, stride, size):
    """bf16 (autocast or bf16 weights): inference, a training forward and its input gradient stay within bf16
    rounding of fp32."""
    torch.manual_seed(2)
    layer = HaloAttention(dim, stride=stride, num_heads=4, block_size=8 if size == (8, 8) else 4, halo_size=2)
    x = torch.randn(2, dim, *size, requires_grad=True)
    ref = layer(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)

    def rel(a, b):
        return ((a.float() - b).abs().max() / b.abs().max()).item()

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        inference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = layer(x)
    (g,) = torch.autograd.grad(trained.float().square().sum(), x)
    assert inference.dtype == trained.dtype == torch.bfloat16
    assert rel(inference, ref) < 2e-2 and rel(trained, ref) < 2e-2 and rel(g, g_ref) < 4e-2
    assert rel(layer.to(torch.bfloat16)(x.detach().bfloat16()), ref) < 2e-2  # bf16 weights, no autocast


def test_hooks_change_nothing_but_what_they_observe():
    """The plain layer has one computation per path: observing the probabilities or the projections (forward
    hooks on ``attn_probs``, ``q``, ``kv``) gives bitwise the same output, in inference and in training."""
    torch.manual_seed(7)
    layer = HaloAttention(8, 8, num_heads=2, block_size=4, halo_size=1)
    x = torch.randn(2, 8, 10, 7)
    with use_fused_attn(False):
        with torch.no_grad():
            plain = layer(x)
        trained = layer(x)
        seen = []
        hooks = [
            m.register_forward_hook(lambda m, i, o: seen.append(o.shape)) for m in (layer.attn_probs, layer.q, layer.kv)
        ]
        with torch.no_grad():
            observed = layer(x)
        observed_trained = layer(x)
        for h in hooks:
            h.remove()
    assert len(seen) == 6
    assert torch.equal(plain, observed) and torch.equal(trained, observed_trained) and torch.equal(plain, trained)
