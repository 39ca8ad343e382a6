"""The halo kernel against an earlier version of itself, op against op: the NCHW predecessor of the channels-last op
(tenth session, issue 20), or any channels-last version (``--same-layout``).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/halo/layout_ab.py            # against commit 3e099a5
    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/halo/layout_ab.py --against 9603af6 --same-layout \
        --out benchmarks/halo/two_vector_ab.json           # the eleventh session's two-vector op against the tenth's

Until commit 3e099a5 ``vitkit::halo_attention`` took NCHW maps with the key/value map halo-padded; since then it
takes channels-last maps, unpadded. This script builds the old op's C++ from git (``git show COMMIT:...``) under
another extension name, next to the current one, feeds each its own layout of the same random tensors (HaloNet-H1's
seven layer shapes at 256 px, batch 1), checks that both give the same attention (1e-5 relative), and times them
interleaved (``vitkit.bench.speed.interleaved``: one call of each per round, median of the rounds): what the op
costs apart from the copies Inductor made around the old one. -> ``layout_ab.json``, one entry per CPU kind. With
``--same-layout`` both ops get the channels-last tensors and the check is bitwise equality (each query's arithmetic
is one sequence in both) or 1e-5 where it is not; each entry then also has the sum over a forward's 19 layers.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from vitkit.bench.speed import interleaved
from vitkit.kernels import halo
from vitkit.machine import cpu_kind, cpu_line

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# H1's layers at 256 px: (map side, heads, head width, stride, layers per forward)
SHAPES = [(64, 8, 8, 1, 3), (64, 8, 16, 2, 1), (32, 8, 16, 1, 2), (32, 8, 32, 2, 1), (16, 8, 32, 1, 9),
          (16, 8, 64, 2, 1), (8, 8, 64, 1, 2)]  # fmt: skip


def old_extension(commit: str):
    """The C++ of ``vitkit/kernels/halo.py`` at ``commit``, built as its own extension."""
    text = subprocess.run(["git", "show", f"{commit}:src/vitkit/kernels/halo.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    return halo.build(f"vitkit_halo_attention_{commit}", re.search(r'_SOURCE = r"""(.*?)"""', text, re.S).group(1))


def _call(op, q, kv, rest, _x):  # each form holds its own layout of the inputs (``interleaved``'s x is unused)
    return op(q, kv, *rest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--against", default="3e099a5", help="the commit whose op to time (NCHW, halo-padded by default)")
    p.add_argument("--same-layout", action="store_true", help="the commit's op takes channels-last maps too")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--out", type=Path, default=HERE / "layout_ab.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    old, new = old_extension(args.against), halo._extension()
    rows = []
    for side, heads, d, stride, layers in SHAPES:
        g = torch.Generator().manual_seed(side * d)
        q = torch.randn(1, heads * d, side // stride, side // stride, generator=g)
        kv = torch.randn(1, heads * 2 * d, side, side, generator=g)
        hrel, wrel = (torch.randn(27, d, generator=g) * d**-0.5 for _ in range(2))
        none, cl = q.new_empty(0), torch.channels_last
        qc, kvc, kvp = q.contiguous(memory_format=cl), kv.contiguous(memory_format=cl), F.pad(kv, (3, 3, 3, 3))
        rest = (hrel, wrel, none, heads, 8, 3, d**-0.5)
        if args.same_layout:
            old_form = (f"op at {args.against}", functools.partial(_call, old.halo_attention, qc, kvc, rest))
        else:
            old_form = (f"NCHW op ({args.against})", functools.partial(_call, old.halo_attention, q, kvp, rest))
        forms = dict([old_form, ("channels-last op", functools.partial(_call, new.halo_attention, qc, kvc, rest))])
        a, b = (f(None) for f in forms.values())
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err < 1e-5, f"the two ops disagree: {err:.3g}"
        times = interleaved(forms, q, rounds=args.rounds)
        row = {"map": side, "heads": heads, "head_width": d, "stride": stride, "layers_per_forward": layers,
               "max_rel_diff": err, "bitwise_equal": torch.equal(a, b),
               **{k: round(ms, 3) for k, ms in times.items()}}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[cpu_kind()] = {"cpu": cpu_line(), "torch": torch.__version__, "rounds": args.rounds, "rows": rows}
    if args.same_layout:  # ms per forward: each shape times its layers per forward
        per_forward = {k: round(sum(r[k] * r["layers_per_forward"] for r in rows), 2) for k in forms}
        results[cpu_kind()]["ms_per_forward"] = per_forward
        print(json.dumps(per_forward))
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
