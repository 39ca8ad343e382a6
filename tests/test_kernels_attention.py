"""vitkit.kernels.attention: softmax attention with bf16 products (AVX-512 BF16), against fp64 attention.

The general bound is the arithmetic's, with bf16's unit roundoff u = 2^-8 (8 significant bits, round to nearest).
Rounding Q (times the scale) and K moves each product by at most 2u of itself, so a logit by at most
``delta = 2u * scale * sum_d |q_d k_d|``; a softmax weight then moves by at most ``expm1(2 delta)`` of itself, and
an output (a weighted mean of V's rows) by that times ``max |v|``. Rounding the probabilities (normalised by the sum
of the rounded ones: 2u), V (u) and the cubic exp2 (relative 1.5e-4, twice through the normalisation) add
``(3u + 3e-4) max |v|``; fp32 sums are far below. The tests allow twice that, for the second-order terms.

That bound is a worst case, far above the error seen, so it cannot catch, say, a scale 2% off. Where every
rounding is exact it can be tight: integer Q and K (bf16 holds small integers exactly) with the scale ln 2, so that
the kernel's ``scale * log2 e`` is 1 and every logit an integer; then each probability ``2^(s - max)`` is exact (the
cubic is 1 at a zero fraction), in bf16 too, and so are V's values chosen on a 1/8 grid and their products. What is
left is fp32 rounding in the sums and the final division, so the kernel must equal fp64 attention to 1e-5 of the
values' scale.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitkit.kernels import attention

pytestmark = pytest.mark.skipif(
    attention.unavailable_reason() is not None, reason=f"vitkit.kernels.attention {attention.unavailable_reason()}"
)

U = 2.0**-8  # bf16's unit roundoff


def _bound(q, k, v, scale) -> torch.Tensor:
    """Per (batch, head) bound on ``max |out - exact|`` from the module docstring, doubled."""
    delta = 2 * U * scale * (q.abs().double() @ k.abs().double().transpose(-1, -2)).amax(dim=(-1, -2))
    vmax = v.abs().double().amax(dim=(-1, -2))
    return 2 * (torch.expm1(2 * delta) + 3 * U + 3e-4) * vmax


def _check(q, k, v, scale=None):
    out = attention.attention_bf16(q, k, v, scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=s)
    err = (out.double() - exact).abs().amax(dim=(-1, -2))
    assert out.dtype == torch.float32 and out.shape == q.shape and out.is_contiguous()
    assert (err <= _bound(q, k, v, s)).all(), (err.max().item(), _bound(q, k, v, s).min().item())
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


@pytest.mark.parametrize(
    "q_shape, m",
    [((2, 3, 37, 8), 21), ((1, 4, 256, 24), 256), ((1, 2, 9, 33), 50), ((1, 1, 5, 30), 17), ((1, 1, 3, 1), 1)],
)
def test_exact_where_every_rounding_is_exact(q_shape, m):
    """Integer logits (integer Q, K, the scale ln 2) and V on a 1/8 grid: the kernel is fp64 attention up to fp32
    rounding (module docstring). Catches what the general bound cannot: a layout or a mask a little off, a scale
    off by more than bf16 can tell (1% here)."""
    g = torch.Generator().manual_seed(6)
    b, h, n, d = q_shape
    q = torch.randint(-2, 3, q_shape, generator=g).float()
    k = torch.randint(-2, 3, (b, h, m, d), generator=g).float()
    v = torch.randint(-64, 65, (b, h, m, d), generator=g).float() / 8
    out = attention.attention_bf16(q, k, v, math.log(2))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=math.log(2))
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5 * v.abs().max().item())


def test_large_logits_give_the_argmax_row_and_stay_finite():
    """Logits in the hundreds and thousands (the softmax subtracts each row's maximum before the exponential):
    with one key per query ahead of every other by hundreds, each output row is that key's value (rounded to
    bf16), and nothing overflows."""
    g = torch.Generator().manual_seed(2)
    n = 24
    q = torch.eye(n).expand(1, 2, n, n) * torch.tensor([300.0, 3000.0])[None, :, None, None]
    k = torch.eye(n).expand(1, 2, n, n)[:, :, torch.randperm(n, generator=g)]
    v = torch.randn(1, 2, n, n, generator=g)
    out = attention.attention_bf16(q, k, v, 1.0)
    expected = (torch.softmax((q @ k.transpose(-1, -2)).double(), -1) @ v.double()).float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=U, atol=0)
    torch.testing.assert_close(out, v.bfloat16().float()[:, :, (q @ k.transpose(-1, -2)).argmax(-1)[0, 0]])


def test_each_output_is_a_weighted_mean_of_the_values():
    """The probabilities are non-negative and normalised by the sum of the same (rounded) probabilities: every output
    channel lies within the range of the values' channel (widened by bf16's rounding of V, u, and the fp32 sums)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 70, 12, generator=g) * 3 for _ in range(3))
    out = attention.attention_bf16(q, k, v)
    slack = (U + 1e-5) * v.abs().amax(dim=2, keepdim=True)
    assert (out <= v.amax(dim=2, keepdim=True) + slack).all() and (out >= v.amin(dim=2, keepdim=True) - slack).all()


@pytest.mark.parametrize("shape", [(3, 5, 33, 24), (1, 1, 100, 24)])
def test_threads_change_nothing(shape):
    """Each query row is computed whole by one thread, whether threads take a head each (15 heads) or, with fewer
    heads than threads (one head, two threads), blocks of rows: the result is the same to the bit."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
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
