"""A prototype fused halo attention kernel (``fused_halo.cpp``) against the plain layer's attention core, eager and
compiled, on HaloNet-H1's attention shapes at batch 1 (issue 20: a ``kernels/`` candidate must beat the compiled
plain layer on the machine at hand).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/halo/fused_kernel.py     # -> fused_kernel.json, one entry per CPU

The plain core is what ``HaloAttention`` does after its projections: the relative-logit bias ``rh[ky] + rw[kx]``
broadcast over the 14 x 14 window, then ``F.scaled_dot_product_attention`` with it; "compiled" is that function
under ``torch.compile`` (Inductor turns the bias into one scalar loop: its index divides by 14). The kernel adds the
two factors to each query's logits as they are formed (nothing of the bias's size is written), then softmax and the
value product, 4 queries per register block, ATen's ``Vectorized<float>`` (AVX2). It is built with
``torch.utils.cpp_extension.load_inline`` (a C++ compiler and ninja needed) and runs on one thread. Errors are
against a float64 computation of the same attention. Not part of vitkit: it has no custom-op registration (so
``torch.compile`` would break the graph at it), no threads and no key-padding mask.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load_inline

from vitkit.bench.speed import timeit
from vitkit.machine import cpu_info, cpu_line

HERE = Path(__file__).resolve().parent
# (name, blocks (heads = 8), qk width, v width, calls per H1 forward at 256 px, batch 1); 64 queries, 196 keys
SHAPES = [("stage 0", 64, 8, 8, 3), ("stage 1", 16, 16, 16, 2), ("stage 2", 4, 32, 32, 5)]
HEADS, QUERIES, WIN = 8, 64, 14


def measure(ext, blocks: int, d: int, e: int) -> dict:
    """The plain core (eager and compiled) and the kernel on the layer's own layout: (B*heads, blocks, L, width)."""
    L, S, scale = QUERIES, WIN * WIN, d**-0.5
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(HEADS, blocks, n, w, generator=g) for n, w in ((L, d), (S, d), (S, e)))
    rh, rw = (torch.randn(HEADS, blocks, L, WIN, generator=g) * 0.3 for _ in range(2))

    def plain(q, k, v, rh, rw):
        bias = (rh[..., :, None] + rw[..., None, :]).reshape(*rh.shape[:-1], S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    def fused(q, k, v, rh, rw):  # the kernel takes (n, L, width): views of the same tensors
        flat = [t.flatten(0, 1) for t in (q, k, v, rh, rw)]
        return ext.halo_attn(*flat, scale).reshape(HEADS, blocks, L, e)

    forms = {"eager": plain, "compiled": torch.compile(plain, dynamic=False), "fused kernel": fused}
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    ref = (logits + (rh.double()[..., :, None] + rw.double()[..., None, :]).reshape(HEADS, blocks, L, S)).softmax(-1)
    ref = ref @ v.double()
    row = {"shape": {"heads": HEADS, "blocks": blocks, "queries": L, "keys": S, "qk": d, "v": e}}
    with torch.no_grad():
        for label, fn in forms.items():
            err = ((fn(q, k, v, rh, rw).double() - ref).abs().max() / ref.abs().max()).item()
            ms = timeit(lambda fn=fn: fn(q, k, v, rh, rw), warmup=2, repeats=9) * 1e3
            row[label] = {"ms": round(ms, 3), "max_rel_err": err}
    return row


def main() -> int:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        print(f"fused_kernel.py: needs an x86 CPU with AVX2 (this one: {cpu_line()})")
        return 1
    torch.set_num_threads(1)
    ext = load_inline(
        "vitkit_fused_halo_prototype",
        cpp_sources=[(HERE / "fused_halo.cpp").read_text()],
        functions=["halo_attn"],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    )
    rows = {}
    for name, blocks, d, e, calls in SHAPES:
        rows[name] = {**measure(ext, blocks, d, e), "calls_per_forward": calls}
        print(name, json.dumps(rows[name]), flush=True)
    out = HERE / "fused_kernel.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results[cpu_info()["model"]] = {"cpu": cpu_line(), "torch": torch.__version__, "rows": rows}
    out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
