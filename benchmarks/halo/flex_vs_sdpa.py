"""One halonet_h1 stage-0 attention call four ways: SDPA with the relative logits as a bias, FlexAttention with
them as a ``score_mod`` (compiled; the candidate ``kernels/`` path of issue 20), the compiled eager path, and SDPA
without a bias, the relative logits folded into the head dimension (``q' = [q d^-0.5, r_h, r_w]``, ``k' = [k,
onehot(key row), onehot(key column)]``, so ``q'.k'`` is the biased logit: head width 8 + 2 x 14).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/halo/flex_vs_sdpa.py

Shapes: batch 1 x 8 heads, 64 blocks of 64 queries (8 x 8) over 196 window keys (14 x 14), head width 8; median
of 7 calls after 2 warm-ups, 1 thread. Recorded in README.md (AMD EPYC, AVX2, idle, 2026-11-26: SDPA 23.5 ms with
the bias built, 19.1 ms given it; FlexAttention 61.3 ms; compiled eager path 57.3 ms; the folded form is in
README.md's later rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from vitkit.bench.speed import timeit
from vitkit.machine import cpu_line


def median_ms(fn) -> float:
    return timeit(fn, warmup=2, repeats=7) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    N, n, L, S, d, win = 8, 64, 64, 196, 8, 14
    q, k, v = (torch.randn(N, n, length, d) for length in (L, S, S))
    rh, rw = torch.randn(N, n, L, win), torch.randn(N, n, L, win)  # the two relative-logit factors per query

    def bias():
        return (rh[..., :, None] + rw[..., None, :]).reshape(N, n, L, S)

    def score_mod(score, b, h, qi, ki):
        return score + rh[b, h, qi, ki // win] + rw[b, h, qi, ki % win]

    def eager():
        return ((q @ k.transpose(-2, -1)) * d**-0.5 + bias()).softmax(-1) @ v

    eye = torch.eye(win)
    onehot = torch.cat([eye[:, None, :].expand(win, win, win), eye[None].expand(win, win, win)], -1).reshape(S, 2 * win)

    def folded():  # no bias tensor: 2 * win more head channels instead
        qa = torch.cat([q * d**-0.5, rh, rw], -1)
        return F.scaled_dot_product_attention(qa, torch.cat([k, onehot.expand(N, n, S, 2 * win)], -1), v, scale=1.0)

    flex, compiled_eager = torch.compile(flex_attention), torch.compile(eager)
    with torch.inference_mode():
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias())
        candidates = (("flex", flex(q, k, v, score_mod=score_mod)), ("compiled eager", compiled_eager()),
                      ("folded", folded()))  # fmt: skip
        for name, out in candidates:
            print(f"{name} vs SDPA: max abs difference {(out - ref).abs().max():.2e}")
        given = bias()
        rows = {
            "SDPA, bias built": median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias())),
            "SDPA, bias given": median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=given)),
            "FlexAttention (compiled, score_mod)": median_ms(lambda: flex(q, k, v, score_mod=score_mod)),
            "eager path (compiled)": median_ms(compiled_eager),
            "SDPA, relative logits folded into the head dimension": median_ms(folded),
        }
    print(cpu_line())
    for name, ms in rows.items():
        print(f"{name}: {ms:.1f} ms")


if __name__ == "__main__":
    main()
