"""vitkit.kernels.attention: softmax attention with bf16 products (AVX-512 BF16), against fp64 attention.

The bound is the arithmetic's. Rounding to bf16 (unit roundoff u = 2^-9) moves each product of Q (times the scale)
and K by at most 2u of itself, so a logit by at most ``2u * sum_d |q_d k_d| * scale``; a softmax weight
``p_j = e^{s_j} / sum e^{s_i}`` then moves by at most twice the largest logit error, relatively, and an output (a
weighted mean of V's rows) by that times ``max |v|``. Rounding P and V to bf16 and the cubic exp2 (relative 1e-4)
add ``(2u + 1e-4) max |v|``; fp32 sums are far below. The tests use twice that bound.

That bound is a worst case (about 100 times the error seen), too loose to catch, say, a scale 2% off. So the
kernel is also held to an fp64 emulation of its own roundings (Q times scale and log2 e, K, V and the unnormalised
probabilities rounded to bf16 as ``Tensor.bfloat16`` does, round to nearest even like ``vcvtneps2bf16``). What
remains is the cubic exp2: its 1e-4 can carry a probability across a bf16 rounding boundary (one step, 2u
relative) and moves the fp32 normaliser by 1e-4, so an output moves by at most ``(2u + 2e-4) max |v|``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitkit.kernels import attention

pytestmark = pytest.mark.skipif(
    attention.unavailable_reason() is not None, reason=f"vitkit.kernels.attention {attention.unavailable_reason()}"
)

U = 2.0**-9  # bf16's unit roundoff


def _bound(q, k, v, scale) -> torch.Tensor:
    """Per (batch, head) bound on ``max |out - exact|`` from the module docstring, doubled."""
    logit = 2 * U * scale * (q.abs().double() @ k.abs().double().transpose(-1, -2)).amax(dim=(-1, -2))
    vmax = v.abs().double().amax(dim=(-1, -2))
    return 2 * (2 * logit + 2 * U + 1e-4) * vmax


def _emulated(q, k, v, scale) -> torch.Tensor:
    """The kernel's arithmetic in fp64 with its roundings to bf16 (exp2 exact)."""
    qb = (q * (scale * 1.4426950408889634)).bfloat16().double()
    s = qb @ k.bfloat16().double().transpose(-1, -2)
    p = torch.exp2(s - s.amax(-1, keepdim=True))
    return (p.float().bfloat16().double() @ v.bfloat16().double()) / p.sum(-1, keepdim=True)


def _check(q, k, v, scale=None):
    out = attention.attention_bf16(q, k, v, scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=s)
    err = (out.double() - exact).abs().amax(dim=(-1, -2))
    assert out.dtype == torch.float32 and out.shape == q.shape and out.is_contiguous()
    assert (err <= _bound(q, k, v, s)).all(), (err.max().item(), _bound(q, k, v, s).min().item())
    off = (out.double() - _emulated(q, k, v, s)).abs().amax(dim=(-1, -2))
    assert (off <= (2 * U + 2e-4) * v.abs().double().amax(dim=(-1, -2))).all(), off.max().item()
    return out, exact


@pytest.mark.parametrize(
    "q_shape, kv_shape",
    [
        ((1, 4, 256, 24), (1, 4, 256, 24)),  # MobileViT-XS, stride 8 (two 16-channel blocks: one 512-, one 256-bit)
        ((2, 4, 64, 30), (2, 4, 64, 30)),  # stride 16: 30 channels, 15 bf16 pairs
        ((1, 6, 197, 64), (1, 6, 197, 64)),  # ViT-S: 197 keys, not a multiple of 16
        ((2, 3, 37, 7), (2, 3, 21, 7)),  # odd channels, fewer keys than queries, 37 = 4 * 8 + 4 + 1 query rows
        ((1, 2, 5, 33), (1, 2, 50, 33)),  # 33 channels: two full blocks and a 1-channel tail
        ((1, 1, 1, 1), (1, 1, 1, 1)),
    ],
)
def test_matches_fp64_attention_within_the_bf16_bound(q_shape, kv_shape):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(q_shape, generator=g), torch.randn(kv_shape, generator=g), torch.randn(kv_shape, generator=g)
    _check(q, k, v)
    _check(q, k, v, scale=0.3)


def test_reads_strided_q_k_v_as_a_qkv_projection_leaves_them():
    """q, k, v as views of one ``[B, N, 3, heads, dim]`` projection (every stride but the channel's differs from
    contiguous), and a channel stride other than 1 (copied first)."""
    qkv = torch.randn(2, 50, 3, 4, 16, generator=torch.Generator().manual_seed(1)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out, _ = _check(q, k, v)
    torch.testing.assert_close(out, attention.attention_bf16(q.contiguous(), k.contiguous(), v.contiguous()))
    _check(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v)


def test_large_logits_give_the_argmax_row_and_stay_finite():
    """Logits in the thousands (the softmax subtracts each row's maximum before the exponential): each output row is
    the value of the one key whose logit is largest, to bf16 rounding, and nothing overflows."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    out = attention.attention_bf16(q * 1000, k, v)
    pick = (q @ k.transpose(-1, -2)).argmax(-1)
    expected = torch.gather(v, 2, pick[..., None].expand(-1, -1, -1, 8))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=2 * U, atol=2 * U * v.abs().max().item())


def test_each_output_is_a_weighted_mean_of_the_values():
    """The probabilities are non-negative and normalised by their own sum: every output channel lies within the
    range of the values' channel (widened by bf16's rounding of V)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 70, 12, generator=g) * 3 for _ in range(3))
    out = attention.attention_bf16(q, k, v)
    slack = 2 * U * v.abs().amax(dim=2, keepdim=True)
    assert (out <= v.amax(dim=2, keepdim=True) + slack).all() and (out >= v.amin(dim=2, keepdim=True) - slack).all()


def test_threads_change_nothing():
    """Heads are split between threads; each is computed whole by one, so the result is the same to the bit."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 5, 33, 24, generator=g) for _ in range(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention.attention_bf16(q, k, v)
        torch.set_num_threads(2)
        two = attention.attention_bf16(q, k, v)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_bad_input_is_named():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="float32 q, k, v"):
        attention.attention_bf16(q.double(), q.double(), q.double())
    with pytest.raises(RuntimeError, match=r"shape \[B, heads, tokens, dim\]"):
        attention.attention_bf16(q[0], q[0], q[0])
    with pytest.raises(RuntimeError, match="k and v of shape"):
        attention.attention_bf16(q, torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8))
    with pytest.raises(RuntimeError, match="k and v of shape"):
        attention.attention_bf16(q, q, torch.randn(1, 2, 9, 16))


class _Attend(torch.nn.Module):
    """Two attentions on one projection: a plain one and one with a mask (which the kernel does not take)."""

    def __init__(self, masked: bool):
        super().__init__()
        self.qkv, self.masked = torch.nn.Linear(16, 48), masked

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=0.5)
        if self.masked:
            out = out + F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(x.shape[1], x.shape[1]))
        return out


@pytest.mark.parametrize("masked", [False, True])
def test_replace_sdpa_swaps_plain_attention_only_and_compiles(masked):
    """In an exported program, the plain SDPA (with its keyword scale) becomes the kernel and the masked one stays;
    the program then computes the same within the bound, eagerly and under ``torch.compile`` (one graph: the op has
    a fake implementation)."""
    torch.manual_seed(5)
    model, x = _Attend(masked).eval(), torch.randn(2, 10, 16)
    gm = torch.export.export(model, (x,)).module()
    assert attention.replace_sdpa(gm) == 1
    targets = [str(n.target) for n in gm.graph.nodes]
    assert targets.count("vitkit.attention_bf16.default") == 1
    assert targets.count("aten.scaled_dot_product_attention.default") == int(masked)
    with torch.no_grad():
        ref, out = model(x), gm(x)
        torch._dynamo.reset()
        try:
            explained = torch._dynamo.explain(gm)(x)
            compiled = torch.compile(gm, fullgraph=True)(x)
        finally:
            torch._dynamo.reset()
        q, k, v = model.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4).unbind(0)
    assert explained.graph_break_count == 0
    tol = _bound(q, k, v, 0.5).max().item()  # (the masked attention is fp32 in both)
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)
    torch.testing.assert_close(compiled, ref, rtol=0, atol=tol)
