"""vitkit's fused halo attention kernel (``vitkit.kernels.halo``) against the plain layer, eager and compiled: the
attention core alone on HaloNet-H1's shapes, and whole models (issue 20: a ``kernels/`` entry must beat the
compiled plain layer on the machine at hand).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/halo/fused_kernel.py                      # cores, then models
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/halo/fused_kernel.py --models halonet_h1 --batches 1

-> ``fused_kernel.json``, one entry per CPU kind. The plain core is what ``HaloAttention._attend`` does: the
relative-logit factors (the query against both tables' rows, gathered by offset), the bias ``rh[ky] + rw[kx]``
broadcast over the window, then ``F.scaled_dot_product_attention``; the kernel takes the tables and does all of it;
"compiled" is that function under ``torch.compile``. Errors are against float64 of the same attention. The model
rows time ``vitkit.routes.compile_frozen`` of the model as it is and of a copy with ``vitkit.kernels.apply``,
interleaved (one call of each per round, median of the rounds), outputs compared.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import vitkit
from vitkit import kernels
from vitkit.bench.speed import interleaved, timeit
from vitkit.machine import cpu_info, cpu_line
from vitkit.routes import compile_frozen, compile_with_kernels, rel_err

HERE = Path(__file__).resolve().parent
# (name, blocks (8 heads), qk width, v width, calls per H1 forward at 256 px, batch 1); 64 queries, 196 keys
SHAPES = [("stage 0", 64, 8, 8, 3), ("stage 1", 16, 16, 16, 2), ("stage 2", 4, 32, 32, 5)]
HEADS, BLOCK, QUERIES, WIN = 8, 8, 64, 14


def measure_core(blocks: int, d: int, e: int) -> dict:
    """The plain core (eager and compiled) and the kernel on the layer's layout: (B*heads, blocks, L, width)."""
    from vitkit.kernels.halo import halo_attention
    from vitkit.layers.halo_attention import PosEmbedRel

    L, S, scale = QUERIES, WIN * WIN, d**-0.5
    torch.manual_seed(0)
    pos = PosEmbedRel(BLOCK, WIN, d, scale).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(HEADS, blocks, L, d, generator=g), torch.randn(HEADS, blocks, S, d + e, generator=g)

    def plain(q, kv):  # HaloAttention._attend's fused route: the factors, the bias, SDPA
        k, v = kv.split([d, e], dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=pos(q), scale=scale)

    def fused(q, kv):
        out = halo_attention(
            q.flatten(0, 1), kv.flatten(0, 1), pos.height_rel, pos.width_rel, q.new_empty(0), blocks, BLOCK, scale
        )
        return out.reshape(HEADS, blocks, L, e)

    forms = {"eager": plain, "compiled": torch.compile(plain, dynamic=False), "fused kernel": fused}
    k, v = kv.double().split([d, e], dim=-1)
    ref = ((q.double() @ k.transpose(-1, -2)) * scale + copy.deepcopy(pos).double()(q.double())).softmax(-1) @ v
    row = {"shape": {"heads": HEADS, "blocks": blocks, "queries": L, "keys": S, "qk": d, "v": e}}
    with torch.no_grad():
        for label, fn in forms.items():
            err = ((fn(q, kv).double() - ref).abs().max() / ref.abs().max()).item()
            ms = timeit(lambda fn=fn: fn(q, kv), warmup=2, repeats=9) * 1e3
            row[label] = {"ms": round(ms, 3), "max_rel_err": err}
    return row


def measure_model(name: str, batch: int, rounds: int) -> dict:
    model = vitkit.create_model(name).eval()
    x = torch.randn(batch, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0))
    forms = {"compiled": compile_frozen(model, dynamic=False)}
    forms["compiled + kernels"] = compile_with_kernels(model, dynamic=False)
    with torch.no_grad():
        ref = model(x)
        errs = {label: rel_err(fn(x), ref) for label, fn in forms.items()}
    ms = interleaved({"eager": model, **forms}, x, rounds=rounds)
    return {
        "layers_swapped": kernels.applicable(model),
        "ms": {k: round(v, 2) for k, v in ms.items()},
        "max_rel_err": errs,
        "kernels_speedup": round(ms["compiled"] / ms["compiled + kernels"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=["halonet_h1", "halonet26t"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-cores", action="store_true")
    args = p.parse_args(argv)
    reason = kernels.unavailable_reason()
    if reason:
        print(f"fused_kernel.py: the kernel cannot be built here: {reason} ({cpu_line()})")
        return 1
    torch.set_num_threads(1)
    out = HERE / "fused_kernel.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    entry = results.setdefault(cpu_info()["model"], {})  # one entry per CPU kind
    entry.update(cpu=cpu_line(), torch=torch.__version__)
    if not args.skip_cores:
        entry["cores"] = {}
        for name, blocks, d, e, calls in SHAPES:
            entry["cores"][name] = {**measure_core(blocks, d, e), "calls_per_forward": calls}
            print(name, json.dumps(entry["cores"][name]), flush=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
    models = entry.setdefault("models", {})
    for name in args.models:
        for batch in args.batches:
            models.setdefault(name, {})[str(batch)] = row = measure_model(name, batch, args.rounds)
            print(name, batch, json.dumps(row), flush=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
            torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
