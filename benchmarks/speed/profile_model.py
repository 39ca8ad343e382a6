"""Where the time goes: torch.profiler op table for one model's fp32 inference (default batch 16, 2 threads).

python benchmarks/speed/profile_model.py mobilevit_xxs          # prints the top ops, writes profile_<model>.txt
python benchmarks/speed/profile_model.py halonet_h1 1 1         # batch 1, 1 thread -> profile_halonet_h1_b1_t1.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import vitkit
from vitkit.machine import cpu_line

HERE = Path(__file__).resolve().parent


def main(name: str, batch: int = 16, threads: int = 2) -> None:
    batch, threads = int(batch), int(threads)
    torch.set_num_threads(threads)
    model = vitkit.create_model(name).eval()
    x = torch.randn(batch, *model.pretrained_cfg["input_size"])
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                model(x)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    default = (batch, threads) == (16, 2)
    out = HERE / (f"profile_{name}.txt" if default else f"profile_{name}_b{batch}_t{threads}.txt")
    command = f"python benchmarks/speed/profile_model.py {name}" + ("" if default else f" {batch} {threads}")
    out.write_text(f"{command}\n{cpu_line()}, batch {batch}, 3 forwards\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main(*sys.argv[1:4])
