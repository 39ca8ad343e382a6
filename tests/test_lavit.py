"""LaViT: less-attention algebra, DP loss properties, attention inheritance, composability, cost vs its twin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.bench import count_macs
from vitkit.layers.less_attention import AttentionDownsample, LessAttention, VanillaAttention, dp_loss
from vitkit.models.lavit import _HIER, _ISO


def test_vanilla_attention_returns_scaled_scores_and_probabilities():
    torch.manual_seed(0)
    attn = VanillaAttention(16, num_heads=2).eval()
    x = torch.randn(2, 9, 16)
    out, scores, probs = attn(x, (3, 3))
    q = attn.q(x).reshape(2, 9, 2, 8).transpose(1, 2)
    k = attn.kv(x)[..., :16].reshape(2, 9, 2, 8).transpose(1, 2)
    torch.testing.assert_close(scores, q @ k.transpose(-2, -1) / 8**0.5)
    torch.testing.assert_close(probs, scores.softmax(-1))
    assert out.shape == x.shape


def test_less_attention_is_a_bilinear_map_of_the_previous_scores():
    torch.manual_seed(1)
    la = LessAttention(16, 2, num_queries=9, num_keys=9, share_heads=False)
    with torch.no_grad():
        for p in (la.theta, la.psi, la.theta_bias, la.psi_bias):
            p.normal_()
    a = torch.randn(2, 2, 9, 9)
    # A_l = Psi(Theta(A)^T)^T = W_psi^T (A W_theta + b_theta) + b_psi^T   (per head)
    expected = la.psi.transpose(-2, -1) @ (a @ la.theta + la.theta_bias) + la.psi_bias.transpose(-2, -1)
    torch.testing.assert_close(la.transform(a), expected)


def test_identity_init_reuses_previous_attention():
    torch.manual_seed(2)
    la = LessAttention(16, 2, num_queries=9, num_keys=9).eval()
    x, prev = torch.randn(1, 9, 16), torch.randn(1, 2, 9, 9)
    out, carried, probs = la(x, (3, 3), prev)
    torch.testing.assert_close(carried, prev)
    torch.testing.assert_close(probs, prev.softmax(-1))
    v = la.v(x).reshape(1, 9, 2, 8).transpose(1, 2)
    torch.testing.assert_close(out, la.proj((probs @ v).transpose(1, 2).reshape(1, 9, 16)))


def test_less_attention_options():
    torch.manual_seed(3)
    prev = torch.randn(1, 2, 9, 9)
    x = torch.randn(1, 9, 16)
    post = LessAttention(16, 2, 9, 9, carry="post")
    _, carried, probs = post(x, (3, 3), prev)
    assert torch.equal(carried, probs)
    res = LessAttention(16, 2, 9, 9, residual=True)
    torch.testing.assert_close(res.transform(prev), 2 * prev)  # identity map + residual
    with pytest.raises(ValueError, match="carry must be one of"):
        LessAttention(16, 2, 9, 9, carry="mid")
    with pytest.raises(ValueError, match="carried attention has shape"):
        LessAttention(16, 2, 9, 9)(x, (3, 3), torch.randn(1, 2, 4, 4))


def _probs(logits):
    return logits.softmax(-1)


def test_dp_symmetry_term_zero_for_symmetric_and_grows_with_asymmetry():
    torch.manual_seed(4)
    p_sym = torch.full((1, 1, 6, 6), 1 / 6)
    diag_only = dp_loss([p_sym])
    sym_term = lambda p: (p - p.transpose(-2, -1)).abs().mean()  # noqa: E731
    assert sym_term(p_sym) == 0
    assert dp_loss([p_sym]) == diag_only
    asym = [torch.tensor([[0.5, 0.5 - e, e], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])[None, None] for e in (0.0, 0.1, 0.3)]
    vals = [sym_term(p).item() for p in asym]
    assert vals[0] < vals[1] < vals[2]
    losses = [dp_loss([p]).item() for p in asym]
    assert losses[0] < losses[1] < losses[2]  # the diagonal term is the same for the three


def test_dp_diagonal_term_falls_as_diagonal_dominates():
    n = 5
    losses = []
    for d in (0.2, 0.4, 0.6, 0.9):
        p = torch.full((1, 1, n, n), (1 - d) / (n - 1))
        p.diagonal(dim1=-2, dim2=-1).fill_(d)  # symmetric, rows sum to 1
        losses.append(dp_loss([p]).item())
    assert all(a > b for a, b in zip(losses, losses[1:]))
    assert dp_loss([torch.eye(n)[None, None]]).item() == pytest.approx(-1.0)  # the minimum: a pure diagonal


def test_dp_loss_sum_weighs_large_maps_more():
    def shift(n):  # each token attends only to the next one: asymmetric, no diagonal
        return torch.roll(torch.eye(n), 1, dims=1)[None, None]

    small, big = shift(4), shift(16)
    ratio_sum = dp_loss([big], "sum") / dp_loss([small], "sum")
    ratio_mean = dp_loss([big], "mean") / dp_loss([small], "mean")
    assert ratio_sum > 1 > ratio_mean


def test_combined_loss_backpropagates_into_less_attention_maps():
    torch.manual_seed(5)
    model = vitkit.create_model("lavit_tiny", img_size=64, num_classes=10).train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    loss = F.cross_entropy(model(x), y) + 0.5 * model.extra_losses()["dp"]
    loss.backward()
    la = [m for m in model.modules() if isinstance(m, LessAttention)]
    assert la and all(m.theta.grad is not None and m.theta.grad.abs().sum() > 0 for m in la)
    assert all(m.psi.grad.abs().sum() > 0 for m in la)


def test_attention_downsample_pools_grids_and_mixes_heads():
    down = AttentionDownsample(2, 4)
    a = torch.full((1, 2, 16, 4), 3.0)  # 4x4 query grid, 2x2 key grid
    out = down(a, (4, 4), (2, 2), (2, 2), (2, 2))
    assert out.shape == (1, 4, 4, 4)
    torch.testing.assert_close(out, torch.full_like(out, 3.0))  # averages keep a constant map
    # a query-grid pattern pools 2x2: rows of the output are the mean over merged query tokens
    a = torch.arange(16.0).reshape(1, 1, 16, 1).expand(1, 2, 16, 4)
    out = down(a, (4, 4), (2, 2), (2, 2), (2, 2))
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))


def test_stage_without_vanilla_layers_runs_on_inherited_attention():
    model = vitkit.create_model("lavit_tiny", img_size=64, num_va=(2, 0, 1, 0)).eval()
    assert not any(isinstance(b.attn, VanillaAttention) for b in model.stages[1].blocks)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match="first stage needs at least one vanilla-attention layer"):
        vitkit.create_model("lavit_tiny", img_size=64, num_va=(0, 2, 1, 1))


def test_less_attention_composes_with_spatial_reduction_attention():
    """Stage 3 of lavit_tiny: LA maps over SRA's reduced keys (non-square N x M), and a halo-free isotropic one."""
    model = vitkit.create_model("lavit_tiny").eval()
    la = model.stages[2].blocks[1].attn
    assert isinstance(la, LessAttention) and la.sr_ratio == 2
    assert (la.psi.shape[-1], la.theta.shape[-1]) == (196, 49)
    model.record_attention = True
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    shapes = {(r["stage"], r["layer"]): tuple(r["probs"].shape) for r in model.attention_record}
    assert shapes[(2, 1)] == (1, 5, 196, 49) and shapes[(3, 1)] == (1, 8, 49, 49)


def test_input_size_is_fixed_by_img_size():
    model = vitkit.create_model("lavit_small_patch32_224")
    with pytest.raises(ValueError, match=r"lavit_small_patch32_224: expected input size 224x224"):
        model(torch.randn(1, 3, 256, 256))


@pytest.mark.parametrize("name", sorted({**_HIER, **_ISO}))
def test_registered_variants_are_cheaper_than_their_all_vanilla_twins_at_224(name):
    depths = {**_HIER, **_ISO}[name]["depths"]
    with torch.device("meta"):
        lavit = vitkit.create_model(name)
        twin = vitkit.create_model(name, num_va=depths)
    assert count_macs(lavit) < count_macs(twin)
