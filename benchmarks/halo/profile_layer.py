"""Where a HaloAttention call spends its time: torch profiler, forward + backward, one halonet26t shape.

.venv/bin/python benchmarks/halo/profile_layer.py 512 16 2     # dim, map side, stride (batch 8, block 8, halo 2)
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import profile

from vitkit.bench import allocator
from vitkit.layers import HaloAttention


def main(dim: int = 512, size: int = 16, stride: int = 2) -> None:
    torch.set_num_threads(2)
    allocator.tune_allocator()
    torch.manual_seed(0)
    layer = HaloAttention(dim, stride=stride, block_size=8, halo_size=2)
    x = torch.randn(8, dim, size, size, requires_grad=True)

    def step():
        layer(x).sum().backward()

    for _ in range(3):
        step()
    with profile(record_shapes=True) as prof:
        for _ in range(5):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16, max_name_column_width=40))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
