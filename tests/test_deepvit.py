"""DeepViT: re-attention algebra (identity mix = plain attention, permutation mix = permuted heads, where the norm
sits), less attention on re-attention, equivalence with ViT, parameter counts, and the attention-collapse analysis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.bench import count_params
from vitkit.interpret import attention_collapse, capture_attention, plot_attention_collapse
from vitkit.interpret.similarity import attention_similarity, attention_similarity_matrix, saturation_layer
from vitkit.layers import Attention
from vitkit.layers.re_attention import LessReAttention, ReAttention
from vitkit.models.deepvit import ConvStemEmbed, DeepViT
from vitkit.models.vit import VisionTransformer

DIM, HEADS, N = 24, 4, 7


def _pair(norm: str = "none"):
    """A re-attention layer and a plain attention layer holding the same qkv/proj weights."""
    torch.manual_seed(0)
    re = ReAttention(DIM, HEADS, norm=norm).eval()
    plain = Attention(DIM, HEADS).eval()
    plain.load_state_dict({k: v for k, v in re.state_dict().items() if k.startswith(("qkv", "proj"))})
    return re, plain


def _softmax_maps(layer, x):
    q, k, _ = layer.qkv(x).reshape(*x.shape[:2], 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
    return ((q @ k.transpose(-2, -1)) * (DIM // HEADS) ** -0.5).softmax(-1)  # (B, H, N, N), computed here


def _set_mix(layer, theta, bias=None):
    with torch.no_grad():
        layer.reattn.theta.copy_(theta)
        layer.reattn.bias.copy_(torch.zeros(HEADS) if bias is None else bias)


@pytest.mark.parametrize("fused", [False, True])
def test_reattention_with_identity_mix_and_no_norm_is_plain_attention(fused):
    re, plain = _pair()
    _set_mix(re, torch.eye(HEADS))
    plain.fused_attn = fused
    x = torch.randn(2, N, DIM)
    out, scores = re(x)
    assert scores is None  # nothing asked for them
    torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-6)
    _set_mix(re, 2 * torch.eye(HEADS))  # the mix is really used: doubled maps, doubled attention output
    torch.testing.assert_close(re(x)[0] - re.proj.bias, 2 * (plain(x) - plain.proj.bias), rtol=1e-5, atol=1e-6)


def test_permutation_mix_permutes_heads():
    re, plain = _pair()
    perm = torch.tensor([2, 0, 3, 1])  # input head h goes to output head perm[h]
    theta = torch.zeros(HEADS, HEADS)
    theta[torch.arange(HEADS), perm] = 1.0
    _set_mix(re, theta)
    x = torch.randn(2, N, DIM)
    with torch.no_grad(), capture_attention(re) as rec:
        re(x)
    maps = _softmax_maps(re, x)
    for h in range(HEADS):
        torch.testing.assert_close(rec[0].probs[:, perm[h]], maps[:, h])


def test_the_norm_comes_after_the_mix_and_the_scale_after_the_norm():
    re, _ = _pair("bn")
    re.train()
    theta, bias = torch.randn(HEADS, HEADS), torch.randn(HEADS)
    _set_mix(re, theta, bias)
    re.reattn.scale = 0.25
    x = torch.randn(3, N, DIM)
    with capture_attention(re) as rec:
        re(x)
    mixed = torch.einsum("hg,bhnm->bgnm", theta, _softmax_maps(re, x)) + bias[:, None, None]  # Theta^T A + b
    mean, var = mixed.mean((0, 2, 3), keepdim=True), mixed.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = 0.25 * (mixed - mean) / (var + re.reattn.norm.eps).sqrt()  # BatchNorm per head, batch statistics
    torch.testing.assert_close(rec[0].probs, expected.detach(), rtol=1e-4, atol=1e-5)
    ln, _ = _pair("ln")
    with torch.no_grad(), capture_attention(ln) as rec:
        ln(x)
    m = rec[0].probs  # LayerNorm over the head axis: every (query, key) entry has zero mean across heads
    torch.testing.assert_close(m.mean(1), torch.zeros_like(m[:, 0]), atol=1e-5, rtol=0)


def _small_deepvit(**kw) -> DeepViT:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=DIM, depth=4, num_heads=HEADS, num_classes=5, conv_stem=False)
    return DeepViT(**{**args, **kw}).eval()


def test_less_attention_layers_read_the_previous_scores_and_compute_no_qk():
    model = _small_deepvit(num_reattn=2, num_less=1)
    la, before = model.blocks[3].attn, model.blocks[2].attn
    assert isinstance(la, LessReAttention) and la.reattn is not None
    assert not any(n.startswith(("q", "k")) for n, _ in la.named_parameters())  # values only: no Q K^T
    assert before.keep_scores and not model.blocks[1].attn.keep_scores
    x = torch.randn(2, 1, 32, 32).expand(-1, 3, -1, -1).contiguous()
    with torch.no_grad(), capture_attention(model) as rec:
        ref = model(x)
    # at init (Theta = Psi = I) the LA layer attends with its own mix of softmax(previous block's scores)
    got = {}
    hook = before.register_forward_hook(lambda m, i, o: got.update(scores=o[1]))  # returns None: output kept
    with torch.no_grad():
        model(x)
    hook.remove()
    torch.testing.assert_close(rec[3].probs, la.reattn(got["scores"].softmax(-1)))
    # perturbing the earlier block's scores (handed on, not used by that block itself) changes the output
    hook = before.register_forward_hook(lambda m, i, o: (o[0], o[1] + torch.randn_like(o[1])))
    with torch.no_grad():
        perturbed = model(x)
    hook.remove()
    assert not torch.allclose(perturbed, ref)


def test_scores_handed_on_change_the_next_block_only():
    model = _small_deepvit(num_reattn=2, num_less=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, clean = model.forward_intermediates(x, indices=[2, 3], output_fmt="NLC")
        torch.manual_seed(1)
        hook = model.blocks[2].attn.register_forward_hook(lambda m, i, o: (o[0], o[1] + torch.randn_like(o[1])))
        _, scaled = model.forward_intermediates(x, indices=[2, 3], output_fmt="NLC")
        hook.remove()
    torch.testing.assert_close(scaled[0], clean[0])  # block 2 itself: unchanged
    assert (scaled[1] - clean[1]).abs().max() > 1e-3  # block 3 reads the scores: changed


def test_without_reattention_deepvit_is_vit():
    vit_args = dict(img_size=32, patch_size=8, embed_dim=DIM, depth=3, num_heads=HEADS, num_classes=5, mlp_ratio=4.0)
    torch.manual_seed(0)
    vit = VisionTransformer(**vit_args).eval()
    deep = DeepViT(**vit_args, num_reattn=0, conv_stem=False, scale_adjustment=1.0).eval()
    deep.load_state_dict(vit.state_dict())  # the same parameter names: strict
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deep(x), vit(x))


def test_scale_adjustment_scales_the_residual_branches():
    half, one = _small_deepvit(num_reattn=2, scale_adjustment=0.5), _small_deepvit(num_reattn=2, scale_adjustment=1)
    sd = half.state_dict()
    for k in list(sd):  # doubling each branch's last linear layer doubles the branch
        if k.endswith(("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias")):
            sd[k] = 2 * sd[k]
    one.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(half(x), one(x), rtol=1e-4, atol=1e-5)


def test_conv_stem_is_equivariant_to_shifts_by_a_patch():
    torch.manual_seed(0)
    stem = ConvStemEmbed(img_size=64, patch_size=8, embed_dim=DIM).eval()
    assert stem.reduction == (8, 8) and stem.num_patches == 64
    x = torch.randn(1, 3, 64, 64)
    shifted = torch.roll(x, shifts=(8, 8), dims=(2, 3))  # one patch down and right
    with torch.no_grad():
        a, b = (stem(t).reshape(1, 8, 8, DIM) for t in (x, shifted))
    # away from the borders (the 7x7 conv's padding reaches 3 px in), token (i, j) moves to (i + 1, j + 1)
    torch.testing.assert_close(b[:, 2:7, 2:7], a[:, 1:6, 1:6], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="patch_size must be even"):
        ConvStemEmbed(patch_size=7)


def _expected_params(d, depth, heads, n_re, n_less=0, mlp=3, patch=16, tokens=197, classes=1000, conv=True):
    """Closed form, written from the architecture (not from the modules)."""
    w = 64  # the conv stem's width
    conv_stem = 3 * w * 49 + 2 * w + w * w * 9 + 2 * w + w * d * (patch // 2) ** 2 + d
    embed = (conv_stem if conv else 3 * patch * patch * d + d) + d + tokens * d  # + class token, position embedding
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * mlp * d * d + mlp * d + d)
    mix = heads * heads + heads + 2 * heads  # Theta, its bias, BatchNorm affine
    less = -(2 * d * d + 2 * d) + 2 * tokens * tokens + 2 * tokens  # no q/k; LaViT's Theta, Psi and biases
    return embed + depth * block + n_re * mix + n_less * less + 2 * d + d * classes + classes


def test_parameter_counts():
    with torch.device("meta"):
        models = {n: vitkit.create_model(n) for n in ("deepvit_s", "deepvit_l", "deepvit_s_lavit", "deepvit_tiny")}
    counts = {n: count_params(m) for n, m in models.items()}
    assert counts["deepvit_s"] == _expected_params(396, 16, 12, 5)
    assert counts["deepvit_l"] == _expected_params(420, 32, 12, 12)
    assert counts["deepvit_s_lavit"] == _expected_params(396, 16, 12, 5, n_less=4)
    assert counts["deepvit_tiny"] == _expected_params(192, 12, 6, 4, conv=False)
    # the paper's table: DeepViT-S 27M (2 digits: within rounding); DeepViT-L 55M, where the official code's
    # width 420 gives 58.9M (documented in deepvit.py)
    assert abs(counts["deepvit_s"] - 27e6) < 0.5e6
    assert 58.8e6 < counts["deepvit_l"] < 58.9e6


def test_deepvit_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_reattn must be between 0 and depth"):
        DeepViT(depth=4, num_reattn=5)
    with pytest.raises(ValueError, match="num_less > 0 fixes the token count"):
        DeepViT(depth=4, num_reattn=2, num_less=1, dynamic_img_size=True)
    with pytest.raises(ValueError, match="norm must be one of"):
        ReAttention(DIM, HEADS, norm="gn")
    la = LessReAttention(DIM, HEADS, num_tokens=N)
    with pytest.raises(ValueError, match="needs the previous layer's scores over 7 x 7 tokens"):
        la(torch.randn(1, N, DIM), None)


# ---- attention collapse analysis ------------------------------------------------------------------------------


def test_column_similarity_is_deepvits_definition():
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 5, 5).softmax(-1), torch.rand(2, 3, 5, 5).softmax(-1)
    sim = attention_similarity_matrix([a, b, a], axis="column")
    # M^{p,q}_{h,t} = <A^p_{h,:,t}, A^q_{h,:,t}> / (|A^p_{h,:,t}| |A^q_{h,:,t}|), averaged over t and images
    cols = (a * b).sum(2) / (a.norm(dim=2) * b.norm(dim=2))  # (B, H, t)
    torch.testing.assert_close(sim[:, 0, 1], cols.mean((0, 2)))
    torch.testing.assert_close(sim, sim.transpose(1, 2))  # symmetric
    torch.testing.assert_close(sim.diagonal(dim1=1, dim2=2), torch.ones(3, 3))  # unit diagonal
    torch.testing.assert_close(sim[:, 0, 2], torch.ones(3))  # identical layers
    rows = attention_similarity_matrix([a, b], axis="row")[:, 0, 1]
    assert not torch.allclose(rows, sim[:, 0, 1])  # the two definitions differ on non-symmetric maps
    assert attention_similarity([a, a], axis="column") == pytest.approx([1.0])
    # centred (a correlation): a norm's per-head shift and scale leave it at 1; the plain cosine drops
    shifted = 3.0 * a - 0.5
    assert attention_similarity([a, shifted], axis="column", center=True) == pytest.approx([1.0])
    assert attention_similarity([a, shifted], axis="column")[0] < 0.9
    with pytest.raises(ValueError, match="axis must be one of"):
        attention_similarity([a, b], axis="diag")


def test_saturation_layer():
    t = torch.tensor
    assert saturation_layer(t([0.5, 0.95, 0.7, 0.92, 0.99]), 0.9) == 3
    assert saturation_layer(t([0.95, 0.96]), 0.9) == 0
    assert saturation_layer(t([0.95, 0.5]), 0.9) is None
    assert saturation_layer(t([0.95, float("nan"), 0.95]), 0.9) == 2  # a stage boundary breaks the run


def test_collapse_of_uniform_attention_is_total_and_of_a_deepvit_is_a_proper_matrix(tmp_path):
    model = _small_deepvit(num_reattn=2, num_less=1)
    x = torch.randn(6, 3, 32, 32)
    res = attention_collapse(model, x, batch_size=4)  # two chunks: the mean over all images either way
    assert res.layers == [f"blocks.{i}.attn" for i in range(4)] and res.images == 6
    m = res.matrix
    torch.testing.assert_close(m, m.transpose(1, 2))
    torch.testing.assert_close(m.diagonal(dim1=1, dim2=2), torch.ones(HEADS, 4))
    whole = attention_collapse(model, x, batch_size=6)
    torch.testing.assert_close(res.matrix, whole.matrix)
    # a ViT whose queries and keys are all zero attends uniformly in every layer: similarity 1, saturated at once
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=DIM, depth=5, num_heads=HEADS).eval()
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight[: 2 * DIM].zero_()
            blk.attn.qkv.bias[: 2 * DIM].zero_()
    flat = attention_collapse(vit, x)
    torch.testing.assert_close(flat.matrix, torch.ones(HEADS, 5, 5))
    assert flat.saturated_from == 0 and flat.similar_pairs == 4
    path = plot_attention_collapse({"deepvit": res, "uniform vit": flat}, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert model.training is False  # restored


def test_collapse_compares_only_same_shape_maps_across_stages():
    narrow = dict(embed_dims=(16, 32, 32, 32), num_heads=(1, 2, 2, 2), mlp_ratios=(2, 2, 2, 2))
    model = vitkit.create_model("lavit_tiny", img_size=64, num_classes=3, **narrow)
    res = attention_collapse(model, torch.randn(2, 3, 64, 64), axis="row")
    assert len(res.layers) == 8
    m = res.matrix.nanmean(0)
    assert torch.isnan(m[0, 2]) and torch.isnan(m[1, 2])  # stage 1 vs stage 2 maps: not compared
    assert not torch.isnan(m[0, 1]) and not torch.isnan(m[2, 3])
    assert F.mse_loss(m[0, 1].expand(1), torch.ones(1)) < 1  # finite, in range


def test_explain_similarity_writes_deepvits_column_matrix(tmp_path):
    from vitkit.interpret import explain

    model = _small_deepvit(num_reattn=2)
    written = explain(model, torch.randn(1, 3, 32, 32), "similarity", tmp_path)
    col = torch.from_numpy(np.load(written["matrix_column"]))
    assert col.shape == (HEADS, 4, 4)
    torch.testing.assert_close(col, col.transpose(1, 2))
    torch.testing.assert_close(col.diagonal(dim1=1, dim2=2), torch.ones(HEADS, 4))
    assert written["figure"].is_file()
