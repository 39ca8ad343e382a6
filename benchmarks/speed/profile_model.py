"""Where the time goes: torch.profiler op table for one model's fp32 inference at batch 16.

python benchmarks/speed/profile_model.py mobilevit_xxs          # prints the top ops, writes profile_<model>.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import vitkit

HERE = Path(__file__).resolve().parent


def main(name: str, batch: int = 16) -> None:
    torch.set_num_threads(2)
    model = vitkit.create_model(name).eval()
    x = torch.randn(batch, *model.pretrained_cfg["input_size"])
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                model(x)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    (HERE / f"profile_{name}.txt").write_text(f"python benchmarks/speed/profile_model.py {name}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main(*sys.argv[1:2])
