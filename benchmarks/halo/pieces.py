"""Where a HaloAttention forward + backward spends its time, timed piece by piece (no profiler).

    .venv/bin/python benchmarks/halo/pieces.py 256 16 1     # dim, map side, stride (batch 8, block 8, halo 2)

Each piece runs alone, forward and forward + backward against a fixed random gradient, median of 30 after 5
warm-ups. On the 2-core Xeon VM torch.profiler inflated some ops many times over (a 2.4 MB zero fill read
8.75 ms under the profiler against 0.09 ms timed alone), so this times the pieces directly instead. The pieces
do not add up exactly to the whole layer: alone, their inputs are hot in cache.
"""

from __future__ import annotations

import sys

import torch

from vitkit import allocator
from vitkit.bench.speed import timeit
from vitkit.layers import HaloAttention
from vitkit.layers.halo_attention import _GatherWindows


def _ms(fn) -> float:
    return round(timeit(fn, warmup=5, repeats=30) * 1e3, 3)


def _both(fn, grads) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of ``fn`` against fixed output gradients."""
    return _ms(fn), _ms(lambda: torch.autograd.backward(fn(), grads))


def main(dim: int = 256, size: int = 16, stride: int = 1) -> None:
    torch.set_num_threads(2)
    allocator.tune_allocator()
    torch.manual_seed(0)
    layer = HaloAttention(dim, stride=stride, block_size=8, halo_size=2)
    B, heads, dqk = 8, layer.num_heads, layer.dim_head_qk
    b, bs, win, n = layer.block_size, layer.block_size_ds, layer.win_size, size // layer.block_size
    x = torch.randn(B, dim, size, size, requires_grad=True)

    def grad_like(t):
        return torch.randn_like(t)

    rows = {"layer": _both(lambda: layer(x), grad_like(layer(x)))}
    rows["q projection"] = _both(lambda: layer.q(x), grad_like(layer.q(x)))
    rows["kv projection"] = _both(lambda: layer.kv(x), grad_like(layer.kv(x)))
    kv = layer.kv(x).detach().requires_grad_(True)

    def gather():
        return _GatherWindows.apply(kv, heads, (n, n), win, b, dqk)

    rows["pad + window gather"] = _both(gather, tuple(grad_like(t) for t in gather()))
    q = layer.q(x).detach().reshape(B * heads, dqk, n, bs, n, bs).permute(0, 2, 4, 3, 5, 1)
    q = q.reshape(B * heads, n * n, bs * bs, dqk).contiguous().requires_grad_(True)  # as the layer has it
    kT, vT = (t.detach().view(B * heads, n * n, -1, win * win).requires_grad_(True) for t in gather())
    rel = layer.pos_embed.rows  # per-axis logits [rh | rw]; the attention adds their sum onto the logits (a GEMM)
    rows["relative rows"] = _both(lambda: rel(q), grad_like(rel(q)))
    rows["attention (incl. relative logits)"] = _both(
        lambda: layer._attend(q, kT, vT, None), grad_like(layer._attend(q, kT, vT, None))
    )
    print(f"HaloAttention({dim}, stride={stride}) on 8x{dim}x{size}x{size}, fp32, 2 threads")
    print("| piece | fwd ms | fwd+bwd ms |\n|---|---|---|")
    for name, (fwd, both) in rows.items():
        print(f"| {name} | {fwd} | {both} |")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
