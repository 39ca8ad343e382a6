"""HaloAttention against an unfold-based implementation at halonet26t's attention shapes (256 px, batch 8).

    .venv/bin/python benchmarks/halo/layer_speed.py        # writes layer_speed.json beside this file

For each layer shape, dtype (fp32, bf16 autocast) and pass (forward, forward+backward), the median of 20
alternating repeats of: the unfold-based reference (`unfold_reference.py`), vitkit's eager path (the default),
and vitkit's fused SDPA path, all under vitkit's malloc policy (vitkit.bench.allocator); then the peak memory of one
call of each (vitkit.bench.speed.peak_memory_mb), the median of five fresh processes (measured in one process after the
timings, the readings depended on the order of the implementations by up to 15 MB), and the deterministic peak
of live tensors (vitkit.bench.speed.tensor_peak_mb: what the operators allocate, blind to the allocator).
Outputs are compared first (max abs difference to the reference).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from vitkit.bench import allocator
from vitkit.bench.speed import peak_memory_mb, tensor_peak_mb
from vitkit.layers import HaloAttention

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from unfold_reference import unfold_halo_attention  # noqa: E402

# halonet26t at 256 px: stage 3's attention block (16x16, 256 ch), stage 4's strided one (16x16 -> 8x8, 512 ch),
# stage 4's second (8x8, 512 ch); block 8, halo 2, 8 heads
SHAPES = [(256, 16, 1), (512, 16, 2), (512, 8, 1)]


def _setup(dim, size, stride):
    torch.manual_seed(0)
    layer = HaloAttention(dim, stride=stride, block_size=8, halo_size=2)
    x = torch.randn(8, dim, size, size, requires_grad=True)

    def run(mode, backward, dtype, grad=True):
        """One call; ``grad=False`` is inference (``torch.no_grad``), the forward the speed target is about."""
        layer.fused_attn = mode == "fused"
        with torch.set_grad_enabled(grad or backward):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                y = unfold_halo_attention(layer, x) if mode == "unfold" else layer(x)
            if backward:
                y.float().sum().backward()
        return y

    return run


def _memory_one(dim, size, stride, mode, backward, dtype, grad) -> None:
    """Peak memory of one call after one warm-up call, in this (fresh) process; printed for the parent."""
    torch.set_num_threads(2)
    run = _setup(dim, size, stride)
    run(mode, backward, dtype, grad)
    print(peak_memory_mb(lambda: run(mode, backward, dtype, grad)))


def _memory(dim, size, stride, mode, backward, dtype, grad, repeats: int = 5) -> float | None:
    """Median over ``repeats`` fresh processes (single readings of the smallest rows vary by up to 2.5 MB)."""
    args = [str(a) for a in (dim, size, stride, mode, int(backward), dtype, int(grad))]
    values = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--memory", *args], capture_output=True, text=True, check=True)
        value = out.stdout.strip().splitlines()[-1]
        if value == "None":
            return None
        values.append(float(value))
    return statistics.median(values)


def main():
    torch.set_num_threads(2)
    allocator.tune_allocator()  # the same malloc policy for every implementation
    rows = []
    for dim, size, stride in SHAPES:
        run = _setup(dim, size, stride)

        for dtype in ("fp32", "bf16"):
            with torch.no_grad():
                ref = run("unfold", False, dtype).float()
                diffs = {m: (run(m, False, dtype).float() - ref).abs().max().item() for m in ("eager", "fused")}
            # fwd: inference (no_grad), the target's forward; fwd-autograd: the forward of a training step (timed only)
            for pass_, backward, grad in (
                ("fwd", False, False),
                ("fwd-autograd", False, True),
                ("fwd+bwd", True, True),
            ):
                times = {m: [] for m in ("unfold", "eager", "fused")}
                for _ in range(3):
                    for m in times:
                        run(m, backward, dtype, grad)
                for _ in range(20):
                    for m in times:
                        t0 = time.perf_counter()
                        run(m, backward, dtype, grad)
                        times[m].append((time.perf_counter() - t0) * 1e3)
                med = {m: round(statistics.median(t), 2) for m, t in times.items()}
                timed_only = pass_ == "fwd-autograd"
                mem = {m: None if timed_only else _memory(dim, size, stride, m, backward, dtype, grad) for m in times}
                tensors = {}
                for m in times:
                    if not timed_only:
                        f = lambda m=m, b=backward, d=dtype, g=grad, f=run: f(m, b, d, g)  # noqa: E731
                        tensors[m] = round(tensor_peak_mb(f), 1)
                row = dict(
                    dim=dim,
                    size=size,
                    stride=stride,
                    dtype=dtype,
                    pass_=pass_,
                    ms=med,
                    speedup_eager=round(med["unfold"] / med["eager"], 2),
                    speedup_fused=round(med["unfold"] / med["fused"], 2),
                    max_abs_diff=diffs,
                    peak_mem_mb={m: None if v is None else round(v, 1) for m, v in mem.items()},
                    tensor_peak_mb=tensors,
                )
                print(row, flush=True)
                rows.append(row)
    out = dict(
        command="python benchmarks/halo/layer_speed.py",
        torch=torch.__version__,
        machine=dict(platform=platform.platform(), threads=torch.get_num_threads()),
        rows=rows,
    )
    (HERE / "layer_speed.json").write_text(json.dumps(out, indent=2))
    print(table(rows))


def table(rows) -> str:
    """The README's markdown table from the recorded rows (``--table`` prints it from layer_speed.json)."""

    def mb(row, key, m):
        v = row[key].get(m)
        return "-" if v is None else f"{v}"

    head = (
        "| layer (C, map, stride) | dtype | pass | unfold ms | eager ms (x) | fused SDPA ms (x) "
        "| unfold RSS MB | eager RSS | fused RSS | unfold tensors MB | eager tensors | fused tensors |"
    )
    lines = [head, "|" + " --- |" * 12]
    for r in rows:
        ms = r["ms"]
        memory = " | ".join(
            mb(r, k, m) for k in ("peak_mem_mb", "tensor_peak_mb") for m in ("unfold", "eager", "fused")
        )
        lines.append(
            f"| {r['dim']}, {r['size']}x{r['size']}, {r['stride']} | {r['dtype']} | {r['pass_']} | {ms['unfold']} "
            f"| **{ms['eager']} ({r['speedup_eager']:.2f}x)** | {ms['fused']} ({r['speedup_fused']:.2f}x) | {memory} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        print(table(json.loads((HERE / "layer_speed.json").read_text())["rows"]))
    elif sys.argv[1:2] == ["--memory"]:
        d, sz, st, mode, bwd, dt, grad = sys.argv[2:9]
        _memory_one(int(d), int(sz), int(st), mode, bool(int(bwd)), dt, bool(int(grad)))
    else:
        main()
