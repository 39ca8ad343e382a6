"""vitkit's fused halo attention kernel (``vitkit.kernels.halo``) against the plain layer, eager and compiled: the
attention core alone on HaloNet-H1's shapes, and whole models (issue 20: a ``kernels/`` entry must beat the
compiled plain layer on the machine at hand).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/halo/fused_kernel.py                      # cores, then models
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/halo/fused_kernel.py --models halonet_h1 --batches 1

-> ``fused_kernel.json``, one entry per CPU kind. The layer rows take the first HaloAttention layer of each of
HaloNet-H1's stages with its real input (256 px, batch 1, random weights) and time it plain (eager: the two 1x1
convolutions, the query blocks and key windows gathered, the relative-logit bias, SDPA, the output permuted back),
plain under ``torch.compile``, and with the kernel (eager: the op does everything between the convolutions). Errors
are against the plain layer in float64. The model rows time ``vitkit.routes.compile_frozen`` of the model as it is
and of a copy with ``vitkit.kernels.apply``, interleaved (one call of each per round, median of the rounds), outputs
compared. (Since 2026-11-27 ``apply`` also swaps plain ``nn.Linear`` layers for oneDNN's, in a HaloNet the classifier
alone; the rows recorded before it are the halo kernel alone.)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import vitkit
from vitkit import kernels
from vitkit.bench.speed import interleaved
from vitkit.layers.halo_attention import HaloAttention
from vitkit.machine import cpu_kind, cpu_line
from vitkit.routes import compile_frozen, compile_with_kernels, rel_err

HERE = Path(__file__).resolve().parent


def h1_layers() -> dict[str, tuple[HaloAttention, torch.Tensor]]:
    """The first HaloAttention layer of each stage of HaloNet-H1 (random weights) with its input at 256 px, batch 1,
    and how many layers of that shape a forward runs."""
    model = vitkit.create_model("halonet_h1").eval()
    seen: dict[tuple, list] = {}

    def keep(layer, inputs, _):
        key = (tuple(inputs[0].shape), layer.block_stride, layer.dim_out_v)
        seen.setdefault(key, [layer, inputs[0], 0])[2] += 1

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, HaloAttention)]
    with torch.no_grad():
        model(torch.randn(1, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0)))
    for h in hooks:
        h.remove()
    return {f"{tuple(x.shape[1:])} stride {layer.block_stride}": (layer, x, n) for layer, x, n in seen.values()}


def measure_core(layer: HaloAttention, x: torch.Tensor) -> dict:
    """One layer: plain eager, plain compiled, and a copy with the kernel (eager: the op is the layer's core), timed
    interleaved."""
    fused = copy.deepcopy(layer)
    kernels.apply(fused)
    forms = {"eager": layer, "compiled": torch.compile(layer, dynamic=False), "fused kernel": fused}
    ref = copy.deepcopy(layer).double()(x.double())
    row = {"shape": {"heads": layer.num_heads, "qk": layer.dim_head_qk, "v": layer.dim_head_v,
                     "block": layer.block_size, "halo": layer.halo_size, "stride": layer.block_stride}}  # fmt: skip
    with torch.no_grad():
        for label, fn in forms.items():
            err = ((fn(x).double() - ref).abs().max() / ref.abs().max()).item()
            row[label] = {"max_rel_err": err}
        for label, ms in interleaved(forms, x, rounds=25).items():
            row[label]["ms"] = round(ms, 3)
    return row


def measure_model(name: str, batch: int, rounds: int) -> dict:
    """The model eager, compiled, and compiled with the kernels, interleaved."""
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
    p.add_argument("--out", type=Path, default=HERE / "fused_kernel.json")
    args = p.parse_args(argv)
    reason = kernels.unavailable_reason()
    if reason:
        print(f"fused_kernel.py: the kernel cannot be built here: {reason} ({cpu_line()})")
        return 1
    torch.set_num_threads(1)
    out = args.out
    results = json.loads(out.read_text()) if out.exists() else {}
    entry = results.setdefault(cpu_kind(), {})  # one entry per CPU kind
    entry.update(cpu=cpu_line(), torch=torch.__version__)
    if not args.skip_cores:
        entry["cores"] = {}
        for name, (layer, x, calls) in h1_layers().items():
            entry["cores"][name] = {**measure_core(layer, x), "calls_per_forward": calls}
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
