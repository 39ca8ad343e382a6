"""HaloNet-H1 vs a global-attention ViT-B/16 as the input grows: forward time and peak memory, batch 1.

    .venv/bin/python benchmarks/halo/scaling.py      # -> scaling.json, scaling.png

Each (model, size, dtype) runs in a fresh process under vitkit's malloc policy (vitkit.bench.allocator): median of 3
timed forwards after one warm-up, then the peak memory of one forward (vitkit.bench.speed.peak_memory_mb: the
resident-set high-water mark over the call under exact allocator accounting).
The ViT is `vit_base_patch16_224` with `dynamic_img_size=True` (position embeddings interpolated per size).
bf16 is CPU autocast.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = (256, 384, 512, 768, 1024)
MODELS = {"halonet_h1": {}, "vit_base_patch16_224": {"dynamic_img_size": True}}


def one(name: str, size: int, dtype: str) -> dict:
    import torch

    import vitkit
    from vitkit.bench import allocator, count_macs
    from vitkit.bench.speed import peak_memory_mb

    torch.set_num_threads(2)
    allocator.tune_allocator()  # timings under vitkit's malloc policy; memory below under exact accounting
    model = vitkit.create_model(name, **MODELS[name]).eval()
    x = torch.randn(1, 3, size, size)

    def fwd():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            return model(x)

    fwd()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fwd()
        times.append(time.perf_counter() - t0)
    mem = peak_memory_mb(fwd)
    gmacs = count_macs(model, (3, size, size)) / 1e9
    return dict(
        model=name,
        size=size,
        dtype=dtype,
        gmacs=round(gmacs, 2),
        ms=round(statistics.median(times) * 1e3, 1),
        peak_mem_mb=None if mem is None else round(mem, 1),
    )


def main():
    if len(sys.argv) == 4:
        print(json.dumps(one(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
        return
    rows = []
    for name in MODELS:
        for dtype in ("fp32", "bf16"):
            for size in SIZES:
                out = subprocess.run([sys.executable, __file__, name, str(size), dtype], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    summary = {}
    for name in MODELS:
        for dtype in ("fp32", "bf16"):
            r = {row["size"]: row for row in rows if row["model"] == name and row["dtype"] == dtype}
            pixels = (SIZES[-1] / SIZES[0]) ** 2
            summary[f"{name}/{dtype}"] = dict(
                time_growth=round(r[SIZES[-1]]["ms"] / r[SIZES[0]]["ms"], 2),
                pixel_growth=pixels,
                time_growth_over_linear=round(r[SIZES[-1]]["ms"] / r[SIZES[0]]["ms"] / pixels, 2),
            )
    import torch

    result = dict(
        command="python benchmarks/halo/scaling.py",
        torch=torch.__version__,
        machine=dict(platform=platform.platform(), threads=2),
        rows=rows,
        summary=summary,
    )
    (HERE / "scaling.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name in MODELS:
            for dtype, ls in (("fp32", "-"), ("bf16", "--")):
                r = [row for row in rows if row["model"] == name and row["dtype"] == dtype]
                px = [row["size"] ** 2 / 1e6 for row in r]
                axes[0].plot(px, [row["ms"] for row in r], ls, marker="o", label=f"{name} {dtype}")
                axes[1].plot(px, [row["peak_mem_mb"] for row in r], ls, marker="o", label=f"{name} {dtype}")
        for ax, yl in zip(axes, ("forward time (ms), batch 1", "peak memory growth (MB)")):
            ax.set_xlabel("megapixels")
            ax.set_ylabel(yl)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(HERE / "scaling.png", dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
