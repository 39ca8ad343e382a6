"""Efficiency measurements: parameters and exact MACs (speed and memory land with the bench issue)."""

from vitkit.bench.flops import count_macs, count_params

__all__ = ["count_macs", "count_params"]
