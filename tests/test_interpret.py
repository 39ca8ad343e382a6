"""Interpretability properties: capture on every family, rollout, attention distance, pos-embed similarity."""

from __future__ import annotations

import pytest
import torch

from conftest import input_size_for, small_model
from vitkit.interpret import (
    attention_rollout,
    attention_similarity,
    attention_similarity_matrix,
    capture_attention,
    mean_attention_distance,
    pos_embed_similarity,
)
from vitkit.layers import fused_attn


@pytest.mark.parametrize(
    "name", ["vit_tiny_patch16_224", "nest_tiny", "mobilevit_xxs", "mobilevitv2_050", "halonet26t", "lavit_tiny"]
)
def test_capture_attention_every_family(name):
    model = small_model(name).eval()
    x = torch.randn(1, *input_size_for(name))
    with torch.no_grad(), capture_attention(model) as records:
        model(x)
        assert not fused_attn()  # eager inside
    assert fused_attn()  # restored
    assert records, name
    for r in records:
        torch.testing.assert_close(r.probs.sum(-1), torch.ones_like(r.probs.sum(-1)), atol=1e-4, rtol=0)
    n = len(records)
    with torch.no_grad():
        model(x)
    assert len(records) == n  # hooks removed


def test_capture_attention_needs_attention_layers():
    with pytest.raises(ValueError, match="no attention layer"):
        with capture_attention(torch.nn.Linear(2, 2)):
            pass


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    for residual in (True, False):
        torch.testing.assert_close(attention_rollout([eye, eye, eye], residual=residual), torch.eye(5).expand(2, 5, 5))


def test_rollout_rows_are_distributions_and_compose():
    torch.manual_seed(0)
    maps = [torch.rand(1, 2, 4, 4).softmax(-1) for _ in range(3)]
    r = attention_rollout(maps, residual=False)
    torch.testing.assert_close(r.sum(-1), torch.ones(1, 4))
    fused = [m.mean(1) for m in maps]
    torch.testing.assert_close(r, fused[2] @ fused[1] @ fused[0])
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(maps, head_fusion="median")


def test_mean_attention_distance_in_pixels():
    grid, p = (3, 4), 16
    n = 12
    self_attn = torch.eye(n).expand(2, 1, n, n)
    assert mean_attention_distance(self_attn, grid, p).item() == 0.0
    # every query attends to the patch to its right (rows whose right neighbour exists)
    right = torch.zeros(1, 1, n, n)
    for i in range(n):
        if (i % 4) < 3:
            right[0, 0, i, i + 1] = 1.0
        else:
            right[0, 0, i, i] = 1.0
    assert mean_attention_distance(right, grid, p).item() == pytest.approx(16 * 9 / 12)
    # a class token in front is ignored
    with_cls = torch.zeros(1, 1, n + 1, n + 1)
    with_cls[0, 0, 1:, 1:] = right[0, 0]
    with_cls[0, 0, 1:, 0] = 5.0  # mass on the class token is dropped, then rows renormalise
    with_cls[0, 0, 0, 0] = 1.0
    assert mean_attention_distance(with_cls, grid, p, num_prefix_tokens=1).item() == pytest.approx(16 * 9 / 12)


def test_pos_embed_similarity_grid():
    model = small_model("vit_tiny_patch16_224")
    sim = pos_embed_similarity(model.pos_embed.detach(), model.patch_embed.grid_size)
    assert sim.shape == (4, 4, 4, 4)
    torch.testing.assert_close(sim.reshape(16, 16).diagonal(), torch.ones(16))
    torch.testing.assert_close(sim.reshape(16, 16), sim.reshape(16, 16).T)


def test_attention_similarity_of_identical_layers_is_one():
    a = torch.rand(2, 3, 6, 6).softmax(-1)
    assert attention_similarity([a, a, torch.rand(2, 3, 6, 6)])[0] == pytest.approx(1.0)
    assert attention_similarity([a, torch.rand(2, 3, 4, 4)]) == []  # different shapes are skipped


def test_uniform_attention_distance_is_the_mean_pairwise_distance():
    grid, p = (2, 3), 8
    centres = [((y + 0.5) * p, (x + 0.5) * p) for y in range(2) for x in range(3)]
    pairwise = [((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5 for a in centres for b in centres]
    uniform = torch.full((1, 2, 6, 6), 1 / 6)
    got = mean_attention_distance(uniform, grid, p)
    torch.testing.assert_close(got, torch.full((2,), sum(pairwise) / len(pairwise)))


def test_attention_similarity_matrix_per_head():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 6, 6).softmax(-1)
    b = a.clone()
    b[:, 1] = torch.rand(2, 6, 6).softmax(-1)  # head 1 changes, heads 0 and 2 repeat
    sim = attention_similarity_matrix([a, b, torch.rand(2, 2, 4, 4)])
    assert sim.shape == (3, 3, 3)
    torch.testing.assert_close(sim[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(sim[[0, 2], 0, 1], torch.ones(2))
    assert sim[1, 0, 1] < 0.999 and torch.equal(sim[:, 0, 1], sim[:, 1, 0])
    assert torch.isnan(sim[:, 0, 2]).all() and torch.isnan(sim[2, 2, 2])  # other shape; only 2 heads there


def test_captured_probabilities_equal_an_independent_eager_computation():
    model = small_model("vit_tiny_patch16_224").eval()
    x = torch.randn(2, *input_size_for("vit_tiny_patch16_224"))
    attn = model.blocks[1].attn
    seen = []
    hook = attn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad(), capture_attention(model) as records:
        model(x)
    hook.remove()
    tokens = seen[0]
    B, N, C = tokens.shape
    with torch.no_grad():
        q, k, _ = attn.qkv(tokens).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        expected = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    rec = next(r for r in records if r.layer == "blocks.1.attn")
    assert rec.module is attn and rec.input_shape == (B, N, C)
    torch.testing.assert_close(rec.probs, expected, rtol=1e-5, atol=1e-6)
